"""``backup-agent job check|run``: the jobs of a job file."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import TYPE_CHECKING

from agent.cli import common
from agent.cli.render import ProgressRenderer, size, summary_line
from agent.errors import AgentError, Interrupted

if TYPE_CHECKING:
    from agent.jobs.config import Job
    from agent.jobs.runner import JobResult

# Not agent.jobs.config.DEFAULT_PATH: every command builds this parser, and the job modules
# (imported where they run) cost a backup or a restore 15 ms of start-up.
DEFAULT_PATH = "/etc/backup-agent/jobs.toml"

log = logging.getLogger("backup-agent")


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser],
               parent: argparse.ArgumentParser) -> None:
    # -q/--debug go on the leaf parsers only: argparse lets a subparser's defaults
    # overwrite what its parent parsed.
    job = sub.add_parser("job", help="check or run the backup jobs of a job file",
                         description="Scheduled backups: the jobs of a TOML job file "
                         f"(default {DEFAULT_PATH}; deploy/jobs.toml explains every field).")
    actions = job.add_subparsers(dest="action", required=True, metavar="ACTION")
    check = actions.add_parser("check", parents=[parent], help="check the job file",
                               description="Check every field of the job file and list the "
                               "jobs; warn about what would fail if they ran now.")
    _add_config(check)
    check.set_defaults(run=run_check)
    run = actions.add_parser("run", parents=[parent], help="run jobs now",
                             description="Run the named jobs, or all of them, one after the "
                             "other; exit 1 if any failed (one error line per failed job).")
    _add_config(run)
    run.add_argument("names", metavar="JOB", nargs="*", help="a job to run (default: all)")
    run.add_argument("--parallel", metavar="N", type=common.positive, default=1,
                     help="run up to N jobs at once, each in its own process (memory and "
                     "connections: N times one backup's; default 1, one after the other)")
    common.add_progress(run)
    run.set_defaults(run=run_jobs)


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", default=DEFAULT_PATH,
                   help=f"the job file (default {DEFAULT_PATH})")


def run_check(args: argparse.Namespace) -> int:
    from agent.jobs.config import load_jobs
    from agent.jobs.runner import preflight

    jobs = load_jobs(args.config)
    print(f"{args.config}: {len(jobs.jobs)} job(s)")
    for job in jobs.jobs.values():
        print(f"  {_describe(job)}")
        for problem in preflight(job):
            log.warning('warning: job "%s": %s', job.name, problem)
    return 0


def _describe(job: Job) -> str:
    disks = ", ".join(job.drives) if job.drives else "all disks"
    when = f", a full every {_days(job.full_every)}" if job.full_every else ""
    dest = f"dir {job.dir}" if job.dir else f"command {job.command}"
    keep = f", keep {job.keep_chains} chain(s)" if job.keep_chains else ""
    tls = " over TLS" if job.tls else ""
    return (f"{job.name}: {job.qmp}{tls} ({disks}), mode {job.mode}{when}, "
            f"{job.compression} -> {dest}{keep}")


def _days(seconds: int) -> str:
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % n == 0:
            return f"{seconds // n}{unit}"
    return f"{seconds}s"


def run_jobs(args: argparse.Namespace) -> int:
    from agent.jobs.config import load_jobs
    from agent.jobs.runner import run_job

    jobs = load_jobs(args.config).select(args.names)
    if args.parallel > 1 and len(jobs) > 1:
        return _run_parallel(args, [job.name for job in jobs])
    failed = 0
    for job in jobs:
        renderer = ProgressRenderer(common.progress_mode(args.progress, args.quiet))
        try:
            result = run_job(job, renderer.callback())
        except Interrupted:
            raise  # stop here: no further job starts after Ctrl-C or SIGTERM
        except AgentError as e:
            failed += 1
            _error(args, f'job "{job.name}": {e}', e)
            continue
        except Exception as e:  # a bug: report it, and still run the other jobs
            failed += 1
            _error(args, f'job "{job.name}": internal error: {type(e).__name__}: {e} (run '
                   "with --debug for details)", e)
            continue
        finally:
            renderer.close()
        _report(result)
    return 1 if failed else 0


def _run_parallel(args: argparse.Namespace, names: list[str]) -> int:
    """Each job in its own ``backup-agent job run JOB`` (agent/jobs/fleet.py); they print
    their own lines, no progress bars (they would overwrite each other)."""
    from agent.jobs.fleet import run_parallel

    level = ["--debug"] if args.debug else ["-q"] if args.quiet else []
    progress = "json" if args.progress == "json" else "none"

    def argv(name: str) -> list[str]:
        return [sys.executable, "-c", "from agent.cli.main import entry; entry()", "job", "run",
                "--config", args.config, "--progress", progress, *level, name]

    statuses = run_parallel(names, argv, args.parallel)
    failed = [n for n in names if statuses.get(n, 1) != 0]
    if failed:
        log.info("%d of %d job(s) failed: %s", len(failed), len(names), ", ".join(failed))
    return 1 if failed else 0


def _error(args: argparse.Namespace, message: str, e: BaseException) -> None:
    """One line per failed job, as the main error handler writes it for a command."""
    if args.debug:
        log.exception("failed", exc_info=e)
    sys.stderr.write(common.error_text(message) + "\n")
    sys.stderr.flush()


def _report(r: JobResult) -> None:
    from agent.jobs import catalog

    s = r.summary
    log.info("job %s: %s", r.job, summary_line(s.progress,
                                                 f"backed up {len(s.devices)} device(s)",
                                                 s.archive_bytes))
    log.info("job %s: %s archive %s (%s)", r.job, catalog.kind_name(s.kind), r.archive,
             size(s.archive_bytes))
    for path in r.adopted:
        log.info("job %s: named the archive a killed run left: %s", r.job, path)
    for a in r.pruned:
        log.info("job %s: deleted %s (an old chain)", r.job, a.path)
    for line in r.output.splitlines():
        log.info("job %s: command: %s", r.job, line)
