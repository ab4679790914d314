"""The one output format of every benchmark: ``BENCH <name> <value> <unit>   # note``, so figures
can be compared across commits (importing this sets nothing up: no Ray, no environment)."""


def bench(name: str, value: float, unit: str, note: str = "") -> None:
    print(f"BENCH {name} {value:.4g} {unit}" + (f"   # {note}" if note else ""), flush=True)
