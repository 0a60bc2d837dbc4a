"""``backup-agent info``: what an archive holds."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable

from agent.cli import common, key_cmd
from agent.cli.render import log_contents, printable, size

log = logging.getLogger("backup-agent")


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser],
               parent: argparse.ArgumentParser) -> None:
    p = sub.add_parser("info", parents=[parent], help="show what an archive holds",
                       description="Show an archive's header, devices, configs and totals. "
                       "A file is read through its index; a pipe (-) is read to its end.")
    p.add_argument("path", metavar="PATH")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    key_cmd.add_key_options(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    # here, not at the top: a backup need not pay for this command's imports
    import datetime
    import json

    from agent.archive_info import archive_info

    log.debug("reading archive %s", common.archive_label(args.path))
    found = archive_info(args.path, key_cmd.keys_from(args), common.archive_label(args.path))
    if found.end is None:
        return _locked(found.as_dict(), args.json)
    log_contents(log, found.header, found.devices)
    for cfg in found.configs:
        log.debug("config %r: %d bytes", cfg.name, cfg.size)
    log.debug("%d record(s), seal %s", found.end.records, found.end.chain.hex())
    info = found.as_dict()
    # Written whole, through write_stdout: a closed pipe or a full disk is then one clear
    # error, not a BrokenPipeError from deep inside print or json.dump.
    if args.json:
        common.write_stdout(json.dumps(info, indent=2) + "\n")
        return 0
    created = datetime.datetime.fromtimestamp(info["created"], datetime.UTC)
    t = info["totals"]

    def shown(text: str) -> str:
        # Everything below that the archive wrote, escaped: a newline in the tool version
        # must not forge a line (the seal's, which users keep as tamper evidence).
        return printable(text, backslash=True)

    lines = [
        f"archive   {info['uuid']}",
        f"kind      {info['kind']}",
        *([f"parent    {info['parent_uuid']}"] if info["parent_uuid"] else []),
        *([f"starts    checkpoint {shown(info['checkpoint'])}"] if info["checkpoint"] else []),
        f"created   {created:%Y-%m-%d %H:%M:%S} UTC",
        (f"tool      backup-agent {shown(info['tool_version'])}" if info["format"] == "native"
         else f"format    {shown(info['tool_version'])}"),
        *_consistency(info["properties"], shown),
        *([f"encrypted to {', '.join(info['encrypted_to'])}"] if info["encrypted_to"] else []),
        f"seal      {info['seal']}",
        "",
        f"{'DEVICE':<20} {'SIZE':>12}  PROPERTIES",
    ]
    for d in info["devices"]:
        props = " ".join(f"{shown(k)}={shown(v)}" for k, v in d["properties"].items())
        lines.append(f"{shown(d['name']):<20} {size(d['size']):>12}  {props}")
    if info["configs"]:
        lines += ["", f"{'CONFIG':<20} {'SIZE':>12}"]
        lines += [f"{shown(c['name']):<20} {size(c['size']):>12}" for c in info["configs"]]
    ratio = t["data_bytes"] / t["stored_bytes"] if t["stored_bytes"] else 0.0
    lines += [
        "",
        f"data {size(t['data_bytes'])}, zero {size(t['zero_bytes'])}, "
        f"stored {size(t['stored_bytes'])} (compression {ratio:.2f}x)",
        f"archive {size(t['archive_bytes'])}"
        + (f", configs {size(t['config_bytes'])}" if info["configs"] else ""),
    ]
    common.write_stdout("\n".join(lines) + "\n")
    return 0


def _consistency(props: dict[str, str], shown: Callable[[str], str]) -> list[str]:
    """``consistency: application (frozen: /, /data)`` for a live backup that says."""
    if "consistency" not in props:
        return []
    frozen = [m for m in props.get("frozen-mountpoints", "").split("\n") if m]
    where = f" (frozen: {', '.join(shown(m) for m in frozen)})" if frozen else ""
    return [f"consistency: {shown(props['consistency'])}{where}"]


def _locked(info: dict[str, object], as_json: bool) -> int:
    """An encrypted archive without its key: the clear fields, and what is missing."""
    import datetime
    import json

    if as_json:
        common.write_stdout(json.dumps(info, indent=2) + "\n")
        return 0
    created = datetime.datetime.fromtimestamp(float(info["created"]),  # type: ignore[arg-type]
                                              datetime.UTC)
    recipients = info["encrypted_to"]
    assert isinstance(recipients, list)
    lines = [
        f"archive   {info['uuid']}",
        f"kind      {info['kind']}",
        *([f"parent    {info['parent_uuid']}"] if info["parent_uuid"] else []),
        f"created   {created:%Y-%m-%d %H:%M:%S} UTC",
        f"encrypted to {', '.join(recipients)}",
        "",
        "everything else (devices, configs, data, totals) is encrypted: "
        "give --key KEYFILE to see it",
    ]
    common.write_stdout("\n".join(lines) + "\n")
    return 0
