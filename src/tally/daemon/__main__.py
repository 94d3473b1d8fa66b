"""`python -m tally.daemon CONFIG_JSON`: the detached daemon process that
`tally up` starts. Errors go to its log as `tally: error: ...`, where
`tally up` picks them up."""
import json
import sys

from tally import paths
from tally.daemon.daemon import DaemonConfig, serve
from tally.errors import TallyError


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m tally.daemon CONFIG_JSON (started by `tally up`)", file=sys.stderr)
        return 2
    try:
        serve(DaemonConfig.from_dict(json.loads(argv[0])), paths.runtime_dir())
    except TallyError as exc:
        print(f"tally: error: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    return 0


sys.exit(main(sys.argv[1:]))
