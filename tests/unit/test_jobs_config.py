"""The job file (agent/jobs/config.py): a good file gives the jobs it says, and every wrong
field is one line naming the file, the job and the field."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from agent.archive.codec import CompressionSpec
from agent.archive.format import Compression
from agent.errors import InvalidArgument
from agent.jobs import config
from agent.jobs.config import Job, JobsFile, Tls, load_jobs

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "deploy" / "jobs.toml"

VM1 = """
[jobs.vm1]
qmp = "/run/backup-agent/vm1.qmp"
dir = "/srv/backups/vm1"
"""


def _load(tmp_path: Path, text: str) -> JobsFile:
    path = tmp_path / "jobs.toml"
    path.write_text(text)
    return load_jobs(str(path))


def _error(tmp_path: Path, text: str) -> str:
    with pytest.raises(InvalidArgument) as e:
        _load(tmp_path, text)
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith(f"{tmp_path / 'jobs.toml'}: "), message
    return message[len(f"{tmp_path / 'jobs.toml'}: "):]


def test_the_example_in_the_brief_word_for_word(tmp_path: Path) -> None:
    assert _error(tmp_path, VM1 + 'keep_chains = "x"\n') == (
        'job "vm1": keep_chains must be a positive integer, got "x"')


def test_a_good_file(tmp_path: Path) -> None:
    jobs = _load(tmp_path, """
[defaults]
mode = "incremental"
keep_chains = 4
full_every = "2w"
compression = "zstd:3"
cbw_memory = "64M"
spool_dir = "/var/spool/backup-agent"
spool_limit = 1073741824
cbw_timeout = 9

[jobs.web-1]
qmp = "/run/backup-agent/web-1.qmp"
drives = ["vda", "scsi0-disk"]
dir = "/srv/backups/web-1"
keep_chains = 8
full_every = "36h"
configs = { "web-1.xml" = "/etc/libvirt/qemu/web-1.xml", "notes.txt" = "/root/notes.txt" }

[jobs.101]
qmp = "/run/backup-agent/101.qmp"
mode = "full"
compression = "none"
command = "ssh backup@host put {name}"
commit_command = "ssh backup@host commit {name}"
qemu_nbd_socket = "/run/qemu-server/101_nbd.migrate"

[jobs.far]
qmp = "hv2.example.net:4444"
dir = "/srv/backups/far"
[jobs.far.tls]
creds_dir = "/etc/backup-agent/tls/hv2"
""")
    assert list(jobs.jobs) == ["web-1", "101", "far"]  # the order of the file
    common = dict(mode="incremental", compression=CompressionSpec(Compression.ZSTD, 3),
                  cbw_memory=64 << 20, spool_dir="/var/spool/backup-agent",
                  spool_limit=1 << 30, cbw_timeout=9)
    assert jobs.jobs["web-1"] == Job(
        name="web-1", qmp="/run/backup-agent/web-1.qmp", dir="/srv/backups/web-1",
        drives=("vda", "scsi0-disk"), keep_chains=8, full_every=36 * 3600,
        configs=(("web-1.xml", "/etc/libvirt/qemu/web-1.xml"), ("notes.txt", "/root/notes.txt")),
        **common)
    # A command job: its own values win; keep_chains and full_every of [defaults] are for
    # dir jobs only.
    assert jobs.jobs["101"] == Job(
        name="101", qmp="/run/backup-agent/101.qmp", command="ssh backup@host put {name}",
        commit_command="ssh backup@host commit {name}",
        qemu_nbd_socket="/run/qemu-server/101_nbd.migrate",
        **{**common, "mode": "full", "compression": CompressionSpec(Compression.NONE, 0)})
    far = jobs.jobs["far"]
    assert far.network and not jobs.jobs["101"].network
    assert far.tls == Tls("/etc/backup-agent/tls/hv2", None)
    assert far.keep_chains == 4 and far.full_every == 14 * 86400


def test_defaults_when_nothing_is_said(tmp_path: Path) -> None:
    job = _load(tmp_path, VM1).jobs["vm1"]
    assert job == Job(name="vm1", qmp="/run/backup-agent/vm1.qmp", dir="/srv/backups/vm1")
    assert job.mode == "auto" and job.keep_chains is None and job.full_every is None
    assert job.cbw_memory is None  # the agent's own default applies (agent/live/job.py)
    assert job.compression == CompressionSpec()


@pytest.mark.parametrize(("text", "expected"), [
    # numbers
    ('keep_chains = 0', 'job "vm1": keep_chains must be a positive integer, got 0'),
    ('keep_chains = true', 'job "vm1": keep_chains must be a positive integer, got true'),
    ('keep_chains = 2.5', 'job "vm1": keep_chains must be a positive integer, got 2.5'),
    ('cbw_timeout = -1', 'job "vm1": cbw_timeout must be a positive integer, got -1'),
    ('cbw_timeout = "5"', 'job "vm1": cbw_timeout must be a positive integer, got "5"'),
    # choices and strings
    ('mode = "fast"', 'job "vm1": mode must be one of "full", "incremental", "differential", '
                      '"auto", got "fast"'),
    ('mode = 1', 'job "vm1": mode must be one of'),
    ('compression = "lz4"', 'job "vm1": compression: unknown compression \'lz4\''),
    ('compression = "zstd:99"', 'job "vm1": compression: zstd level 99 is out of range'),
    ('compression = 3', 'job "vm1": compression must be "zstd", "zstd:LEVEL" or "none", got 3'),
    # sizes and durations
    ('cbw_memory = "lots"', 'job "vm1": cbw_memory must be a size of at least 4K, such as '
                            '"256M" or "1G", got "lots"'),
    ('cbw_memory = "1K"', 'job "vm1": cbw_memory must be a size of at least 4K'),
    ('spool_limit = true', 'job "vm1": spool_limit must be a size of at least 4K'),
    ('spool_limit = -4096', 'job "vm1": spool_limit must be a size of at least 4K'),
    ('full_every = "7 days"', 'job "vm1": full_every must be a duration such as "7d", "12h" '
                              'or "2w" (units s, m, h, d, w), got "7 days"'),
    ('full_every = 7', 'job "vm1": full_every must be a duration'),
    ('full_every = "0d"', 'job "vm1": full_every must be a duration'),
    # paths
    ('spool_dir = "spool"', 'job "vm1": spool_dir must be an absolute path, got "spool"'),
    ('spool_dir = ""', 'job "vm1": spool_dir must be a non-empty string, got ""'),
    ('qemu_nbd_socket = 4', 'job "vm1": qemu_nbd_socket must be a non-empty string, got 4'),
    # drives
    ('drives = "vda"', 'job "vm1": drives must be a list of names, e.g. ["vda", "vdb"], '
                       'got "vda"'),
    ('drives = ["vda", 1]', 'job "vm1": drives must be a list of names'),
    ('drives = ["vda", ""]', 'job "vm1": drives must be a list of names'),
    ('drives = ["vda", "vda"]', 'job "vm1": drives must be a list without repeats, got '
                                '["vda", "vda"]'),
    # configs
    ('configs = 3', 'job "vm1": configs must be a table ([...configs]), got 3'),
    ('configs = { "a b" = "/etc/x" }', 'job "vm1": configs: config name \'a b\' is not '
                                       'allowed'),
    ('configs = { "x.xml" = "x.xml" }', 'job "vm1": configs: "x.xml" must be the absolute '
                                        'path of a file, got "x.xml"'),
    # destinations
    ('command = "cat > /x/{name}"', 'job "vm1": give exactly one destination: dir = '),
    ('commit_command = "true"', 'job "vm1": commit_command goes with command'),
    # unknown keys
    ('keep = 3', 'job "vm1": unknown key "keep" (did you mean "keep_chains"?); known keys: '
                 'cbw_listen, cbw_memory, cbw_timeout, command, commit_command, compression, '
                 'configs, dir, drives, encrypt_to, freeze_command, freeze_mountpoints, '
                 'freeze_timeout, fs_freeze, full_every, keep_chains, max_rate, mode, '
                 'qemu_nbd_addr, '
                 'qemu_nbd_socket, qga, qmp, spool_dir, spool_limit, thaw_command, tls'),
    # the guest agent
    ('fs_freeze = "yes"', 'job "vm1": fs_freeze must be one of "auto", "required", "off", '
                          'got "yes"'),
    ('fs_freeze = "required"', 'job "vm1": fs_freeze required needs the guest agent\'s '
                               'channel (qga SOCKET) or freeze_command/thaw_command'),
    ('freeze_command = "virsh domfsfreeze vm1"', 'job "vm1": freeze_command and '
                                                 'thaw_command go together'),
    ('freeze_mountpoints = ["/"]', 'job "vm1": freeze_mountpoint needs qga'),
    ('freeze_timeout = 0', 'job "vm1": freeze_timeout must be a positive integer, got 0'),
    ('qga = "qga.sock"', 'job "vm1": qga must be an absolute path, got "qga.sock"'),
    ('xyzzy = 3', 'job "vm1": unknown key "xyzzy"; known keys: cbw_listen, cbw_memory,'),
    ('cbw_listen = ":10900"', 'job "vm1": cbw_listen is only for a monitor reached over the '
                              'network'),
    ('qemu_nbd_addr = "hv"', 'job "vm1": qemu_nbd_addr is only for a monitor reached over '
                             'the network'),
])
def test_a_wrong_field(tmp_path: Path, text: str, expected: str) -> None:
    message = _error(tmp_path, VM1 + text + "\n")
    assert message.startswith(expected), message


@pytest.mark.parametrize(("text", "expected"), [
    ('[jobs.vm1]\ndir = "/srv/x"', 'job "vm1": qmp is missing'),
    ('[jobs.vm1]\nqmp = 4\ndir = "/srv/x"', 'job "vm1": qmp must be a non-empty string, got 4'),
    ('[jobs.vm1]\nqmp = "vm1.qmp"\ndir = "/srv/x"',
     'job "vm1": qmp must be an absolute Unix socket path or HOST:PORT, got "vm1.qmp"'),
    ('[jobs.vm1]\nqmp = "/run/vm1.qmp"', 'job "vm1": give exactly one destination'),
    ('[jobs.vm1]\nqmp = "/run/vm1.qmp"\ndir = "backups"',
     'job "vm1": dir must be an absolute path, got "backups"'),
    ('[jobs.vm1]\nqmp = "/run/vm1.qmp"\ncommand = "cat"\nkeep_chains = 3',
     'job "vm1": keep_chains needs a dir destination'),
    ('[jobs.vm1]\nqmp = "/run/vm1.qmp"\ncommand = "cat"\nfull_every = "7d"',
     'job "vm1": full_every needs a dir destination'),
    # the network monitor and its tls table
    ('[jobs.vm1]\nqmp = "hv:4444"\ndir = "/srv/x"',
     'job "vm1": qmp "hv:4444" is a network address: it needs a [jobs.vm1.tls] table'),
    ('[jobs.vm1]\nqmp = "[::1]:4444"\ndir = "/srv/x"\ntls = 1',
     'job "vm1": tls must be a table ([...tls]), got 1'),
    ('[jobs.vm1]\nqmp = "hv:4444"\ndir = "/srv/x"\n[jobs.vm1.tls]\npsk_user = "b"',
     'job "vm1": tls: creds_dir is missing'),
    ('[jobs.vm1]\nqmp = "hv:4444"\ndir = "/srv/x"\n[jobs.vm1.tls]\ncreds_dir = "tls"',
     'job "vm1": tls: creds_dir must be an absolute path, got "tls"'),
    ('[jobs.vm1]\nqmp = "hv:4444"\ndir = "/srv/x"\n[jobs.vm1.tls]\ncreds_dir = "/t"\ncert = 1',
     'job "vm1": tls: unknown key "cert"; known keys: creds_dir, psk_file, psk_user'),
    ('[jobs.vm1]\nqmp = "hv:4444"\ndir = "/srv/x"\n[jobs.vm1.tls]\ncreds_dir = "/t"\n'
     'psk_user = "b"', 'job "vm1": tls: psk_user goes with psk_file'),
    ('[jobs.vm1]\nqmp = "hv:4444"\ndir = "/srv/x"\n[jobs.vm1.tls]\ncreds_dir = "/t"\n'
     'psk_file = "k.psk"', 'job "vm1": tls: psk_file must be an absolute path, got "k.psk"'),
    ('[jobs.vm1]\nqmp = "/run/vm1.qmp"\ndir = "/srv/x"\n[jobs.vm1.tls]\ncreds_dir = "/t"',
     'job "vm1": tls is only for a monitor reached over the network'),
    # the file as a whole
    ('', 'no jobs: add a [jobs.NAME] table'),
    ('[jobs]', 'no jobs: add a [jobs.NAME] table'),
    ('jobs = 3', 'jobs must be a table ([...jobs]), got 3'),
    ('[job.vm1]\nqmp = "/run/vm1.qmp"',
     'unknown key "job" (did you mean "jobs"?); known keys: defaults, jobs'),
    ('[jobs]\nvm1 = "/run/vm1.qmp"', 'job "vm1" must be a table ([jobs.vm1]), got '
                                     '"/run/vm1.qmp"'),
    ('[jobs."vm 1"]\nqmp = "/run/vm1.qmp"', 'job name "vm 1" is not usable'),
    ('[jobs.-vm1]\nqmp = "/run/vm1.qmp"', 'job name "-vm1" is not usable'),
    (f'[jobs.{"v" * 65}]\nqmp = "/run/vm1.qmp"', 'job name "vvvv'),
    ('[defaults]\nqmp = "/run/vm1.qmp"\n' + VM1,
     'defaults: unknown key "qmp"; known keys: cbw_memory, cbw_timeout, compression, '
     'encrypt_to, freeze_timeout, fs_freeze, full_every, keep_chains, max_rate, mode, spool_dir, '
     'spool_limit'),
    ('[defaults]\nkeep_chains = -1\n' + VM1,
     'defaults: keep_chains must be a positive integer, got -1'),
    (VM1 + '[jobs.vm2]\nqmp = "/run/vm2.qmp"\ndir = "/srv/backups/vm1/"',
     'jobs "vm1" and "vm2" both write to /srv/backups/vm1/: give each job a directory of '
     'its own'),
    ('[jobs.vm1\nqmp = 1', 'not valid TOML: '),
    ('[jobs.vm1]\nqmp = "/a"\nqmp = "/b"', 'not valid TOML: '),
])
def test_a_wrong_file(tmp_path: Path, text: str, expected: str) -> None:
    message = _error(tmp_path, text + "\n")
    assert message.startswith(expected), message


def test_a_syntax_error_says_where(tmp_path: Path) -> None:
    message = _error(tmp_path, VM1 + "keep_chains = = 3\n")
    assert re.search(r"not valid TOML: .*line 5", message), message


def test_a_missing_or_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match=r"^cannot read .*nope\.toml: No such file"):
        load_jobs(str(tmp_path / "nope.toml"))
    with pytest.raises(InvalidArgument, match=r"^cannot read .*: Is a directory"):
        load_jobs(str(tmp_path))


def test_select_jobs(tmp_path: Path) -> None:
    jobs = _load(tmp_path, VM1 + '[jobs.vm2]\nqmp = "/run/vm2.qmp"\ncommand = "cat"\n')
    assert [j.name for j in jobs.select([])] == ["vm1", "vm2"]
    assert [j.name for j in jobs.select(["vm2", "vm1", "vm2"])] == ["vm2", "vm1"]
    with pytest.raises(InvalidArgument, match=r'no job "vm3" \(it has: vm1, vm2\)$'):
        jobs.select(["vm1", "vm3"])


def test_the_deploy_example_parses_and_shows_every_key() -> None:
    jobs = load_jobs(str(EXAMPLE))
    assert set(jobs.jobs) == {"vm1", "vm2", "vm3"}
    text = EXAMPLE.read_text()
    # Every key a job, [defaults] or a tls table takes is explained there (set, or shown in
    # a comment), so the example is the complete reference it says it is.
    for key in {*config._JOB_KEYS, *config._TLS_KEYS}:
        assert re.search(rf"^((# )?{key} = |\[jobs\.\w+\.{key}\])", text, re.MULTILINE), key


def test_the_cli_default_job_file_is_the_config_default() -> None:
    from agent.cli import job_cmd
    from agent.jobs import config

    assert job_cmd.DEFAULT_PATH == config.DEFAULT_PATH


def test_the_job_file_takes_every_backup_mode_and_no_other(tmp_path: Path) -> None:
    from agent.modes import Mode

    for mode in Mode:
        assert _load(tmp_path, VM1 + f'mode = "{mode.value}"\n').jobs["vm1"].mode == mode.value
    assert _error(tmp_path, VM1 + 'mode = "fast"\n') == (
        'job "vm1": mode must be one of "full", "incremental", "differential", "auto", '
        'got "fast"')


def test_a_bucket_destination(tmp_path: Path) -> None:
    jobs = _load(tmp_path, '[jobs.vm1]\nqmp = "/run/vm1.qmp"\ndir = "s3://backups/vm1"\n'
                 'keep_chains = 3\n[jobs.vm2]\nqmp = "/run/vm2.qmp"\ndir = "s3://backups"\n')
    assert jobs.jobs["vm1"].dir == "s3://backups/vm1/"  # a prefix: objects go under it
    assert jobs.jobs["vm2"].dir == "s3://backups/"
    assert "not a bucket name" in _error(
        tmp_path, '[jobs.vm1]\nqmp = "/run/vm1.qmp"\ndir = "s3://Backups/vm1"\n')
    assert "both write to" in _error(
        tmp_path, '[jobs.a]\nqmp = "/run/a.qmp"\ndir = "s3://backups/vm"\n'
        '[jobs.b]\nqmp = "/run/b.qmp"\ndir = "s3://backups/vm/"\n')


def test_encrypt_to_takes_keys_and_files(tmp_path: Path) -> None:
    from agent import keys

    pair = keys.generate()
    pub_file = tmp_path / "offline.pub"
    pub_file.write_text(pair.public_text + "\n")
    other = keys.generate()
    jobs = _load(tmp_path, f'[defaults]\nencrypt_to = ["{other.public_text}"]\n' + VM1
                 + f'encrypt_to = ["{pub_file}", "{other.public_text}"]\n'
                 + '[jobs.vm2]\nqmp = "/run/vm2.qmp"\ndir = "/srv/vm2"\n')
    assert jobs.jobs["vm1"].encrypt_to == (pair.public, other.public)
    assert jobs.jobs["vm2"].encrypt_to == (other.public,)
    assert _error(tmp_path, VM1 + 'encrypt_to = ["bapub1:AAAA"]\n').startswith(
        'job "vm1": encrypt_to: public key: 3 bytes, expected 32')
