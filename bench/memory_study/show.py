import json, sys
for line in open(sys.argv[1]):
    d = json.loads(line)
    print(d.get("impl"), d["variant"], d["blocks"], d.get("optimizer", ""), d.get("lever"), "first", d.get("first_s"), "med", d.get("later_median_s"),
          "peak", d.get("peak_above_base_mb"), "after", d.get("rss_after_mb"), d.get("losses"), d.get("error", "")[:100])
