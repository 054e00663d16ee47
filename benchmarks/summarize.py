"""Print a short table of a pytest-benchmark JSON file: name, median, and the extra figures."""
import json
import sys


def main(paths):
    for path in paths:
        data = json.load(open(path))
        print(f"# {path}  ({data.get('machine_info', {}).get('node', '')})")
        for b in data["benchmarks"]:
            extra = {k: (round(v, 2) if isinstance(v, float) else v)
                     for k, v in b.get("extra_info", {}).items() if k != "device"}
            print(f"{b['name'][:70]:70s} {b['stats']['median'] * 1e3:9.3f} ms  {extra}")


if __name__ == "__main__":
    main(sys.argv[1:])
