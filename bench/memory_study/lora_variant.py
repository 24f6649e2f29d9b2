"""run.py with one LoRA formulation from lora_impls installed first (pet_hooks' files are not touched).

    .venv/bin/python bench/memory_study/lora_variant.py --impl small_t --blocks 8 [run.py options]

Prints run.py's RESULT line with "impl" added.
"""
import json, os, sys
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))


def main():
    argv = sys.argv[1:]
    impl = "today"
    if "--impl" in argv:
        i = argv.index("--impl")
        impl = argv[i + 1]
        del argv[i:i + 2]
    from lora_impls import install
    install(impl)
    import io, contextlib
    import run
    sys.argv = [sys.argv[0]] + argv
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        run.main()
    for line in buf.getvalue().splitlines():
        if line.startswith("RESULT "):
            out = json.loads(line[7:])
            out["impl"] = impl
            for key in ("ms_memory_stats", "ms_max_allocated", "notes", "traceback"):
                out.pop(key, None)
            print("RESULT " + json.dumps(out), flush=True)
        else:
            print(line)


if __name__ == "__main__":
    main()
