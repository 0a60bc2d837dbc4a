"""``backup-agent prune DIR``: retention by chains, in any directory of archives."""

from __future__ import annotations

import argparse
import logging

from agent.cli import common
from agent.cli.common import one_line
from agent.cli.render import printable, size

log = logging.getLogger("backup-agent")


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser],
               parent: argparse.ArgumentParser) -> None:
    prune = sub.add_parser("prune", parents=[parent], help="delete old chains of archives",
                           description="Keep the newest N chains of archives of each job "
                           "in DIR (a chain: a full archive and everything built on it, found "
                           "from the archives' headers; the job: the name before the time "
                           "stamp, vm1 in vm1-20261126T020000Z-full.arc, other names counting "
                           "as one job) and delete the older chains, whole, newest file "
                           "first. Archives whose full is not in DIR, incomplete full archives "
                           "and other files are left alone. Works on any directory of "
                           "archives, a backup host's too.")
    prune.add_argument("directory", metavar="DIR",
                       help="a directory, or a prefix in a bucket: s3://BUCKET[/PREFIX]")
    prune.add_argument("--keep-chains", metavar="N", type=common.positive, required=True,
                       help="how many chains to keep per job (at least 1)")
    prune.add_argument("--dry-run", action="store_true",
                       help="only show what would be deleted")
    prune.add_argument("--uploads-older-than", metavar="HOURS", type=float, default=24.0,
                       help="s3://: abort the multipart uploads under the prefix started more "
                       "than HOURS ago, left by backups that were killed (default: 24)")
    prune.set_defaults(run=run_prune)


def run_prune(args: argparse.Namespace) -> int:
    from agent.jobs import catalog

    aborted: list[tuple[str, str]] = []
    if args.directory.startswith("s3://"):  # a bucket has no lock: see agent/s3/bucket.py
        from agent.s3 import bucket

        if args.uploads_older_than < 0:
            raise common.UsageError("--uploads-older-than must be 0 or more")
        done = bucket.prune(args.directory, args.keep_chains, args.dry_run,
                            args.uploads_older_than * 3600)
        result = done.result
        aborted = [(f"s3://{args.directory[5:].split('/')[0]}/{up.key}", bucket.when(up))
                   for up in done.aborted]
    elif args.dry_run:
        result = catalog.prune(args.directory, args.keep_chains, dry_run=True)
    else:
        with catalog.locked(args.directory):
            result = catalog.prune(args.directory, args.keep_chains)
    p = result.plan
    doomed = "would delete" if args.dry_run else "deleted"
    for chain in p.delete:
        for a in chain.archives:
            print(f"{doomed:<12}  {printable(a.path)}")
    for chain in p.keep:
        for a in chain.archives:
            print(f"{'keep':<12}  {printable(a.path)}")
    for chain in p.incomplete:
        for a in chain.archives:
            print(f"{'keep':<12}  {printable(a.path)}  (its chain's full archive is incomplete)")
    for a in p.orphans:
        print(f"{'keep':<12}  {printable(a.path)}  (no full archive it builds on is here)")
    for path, why in result.unreadable:
        print(f"{'keep':<12}  {printable(path)}  (not readable as an archive: "
              f"{printable(one_line(why))})")
    for path, started in aborted:
        what = "would abort" if args.dry_run else "aborted"
        print(f"{what:<12}  {printable(path)}  (an upload started {started}, never finished)")
    freed = sum(a.size for c in p.delete for a in c.archives)
    log.info("%s %d chain(s): %d archive(s), %s; kept %d chain(s)%s", doomed,
             len(p.delete), sum(len(c.archives) for c in p.delete), size(freed), len(p.keep),
             " (dry run: nothing deleted)" if args.dry_run else "")
    return 0
