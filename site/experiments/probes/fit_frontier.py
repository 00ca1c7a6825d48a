"""The frontier of a `preset fit` run, from its --json record: for every candidate family, mode,
strength and scope screened, fixed and broken answers on the screening questions, and the points
confirmed on the whole selection split (issue #41: "report the frontier as it is").

    python experiments/probes/fit_frontier.py fit.json
"""

import argparse
import json
from pathlib import Path


def table(record: dict) -> str:
    lines = ["| family | k | mode | strength | scope | fixed | broken | net | worst type loss |",
             "|---|---|---|---|---|---|---|---|---|"]
    for t in sorted(record["screened"], key=lambda t: (t["family"], t["scope"], t["mode"], t["strength"], t["k"])):
        lines.append(f"| {t['family']} | {t['k']} | {t['mode']} | {t['strength']:g} | {t['scope']} | {t['fixed']} | "
                     f"{t['broken']} | {t['net']:+d} | {t['worst_type_loss']:+.3f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("record", help="a `preset fit --json` file")
    record = json.loads(Path(p.parse_args().record).read_text())
    print(f"{len(record['screened'])} points screened on {record['screen_questions']} questions; "
          f"{record['select_questions']} selection questions; {record['minutes']} min\n")
    print(table(record))
    print("\nConfirmed on the whole selection split:\n")
    for t in record["trials"]:
        print(f"- {t['family']} k={t['k']} {t['mode']} x{t['strength']:g} {t['scope']}: fixed {t['fixed']}, "
              f"broken {t['broken']}, by type {t['by_type']}")
    for step in record["steps"]:
        print(f"- step: {step}")
    d = record["diffmean"]
    print(f"\nDifference of means: x{d['strength']:g}, helped={d['helped']}, selection {d['selection']}")


if __name__ == "__main__":
    main()
