#!/bin/sh
# install.sh: install backup-agent's systemd units, tmpfiles entry and example job file on a
# hypervisor (docs/DEPLOY.md, step 3). Run it as root from a checkout, after `make setup`.
#
#   deploy/install.sh [--user USER] [--root DIR]
#
# --user USER  the user QEMU runs as, which the agent runs as too (backup-agent@.service
#              explains why). Default: libvirt-qemu if that user exists (libvirt), else root
#              (Proxmox VE, or QEMU started by hand as root).
# --root DIR   install below DIR instead of / and touch nothing running (for packaging and
#              tests): no systemctl, no systemd-tmpfiles.
#
# It never overwrites /etc/backup-agent/jobs.toml, and it enables no timer: that is done per
# job, once the job has been checked and run by hand.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
root=
user=
while [ $# -gt 0 ]; do
    case $1 in
        --user) user=${2:?--user needs a user name}; shift 2 ;;
        --root) root=${2:?--root needs a directory}; shift 2 ;;
        *) echo "usage: $0 [--user USER] [--root DIR]" >&2; exit 2 ;;
    esac
done
if [ -z "$user" ]; then
    if getent passwd libvirt-qemu >/dev/null; then user=libvirt-qemu; else user=root; fi
fi
case $user in
    '' | *[!A-Za-z0-9_.-]*) echo "install.sh: bad user name: $user" >&2; exit 2 ;;
esac
agent=$repo/.venv/bin/backup-agent
if [ ! -x "$agent" ]; then
    echo "install.sh: $agent is missing: run 'make setup' in $repo first" >&2
    exit 1
fi

units=$root/etc/systemd/system
install -d -m 0755 "$units" "$root/etc/tmpfiles.d" "$root/etc/backup-agent" "$root/usr/local/bin"
ln -sfn "$agent" "$root/usr/local/bin/backup-agent"
for unit in backup-agent@.service backup-agent@.timer; do
    install -m 0644 "$here/systemd/$unit" "$units/$unit"
done
dropins=$units/backup-agent@.service.d
rm -f "$dropins/proxmox.conf" "$dropins/user.conf"  # ours, from an earlier run
if [ "$user" = root ]; then
    install -d -m 0755 "$dropins"
    install -m 0644 "$here/systemd/proxmox.conf" "$dropins/proxmox.conf"
elif [ "$user" != libvirt-qemu ]; then
    install -d -m 0755 "$dropins"
    printf '# written by deploy/install.sh: QEMU runs as %s here\n[Service]\nUser=%s\n' \
        "$user" "$user" > "$dropins/user.conf"
fi
sed "/^d /s/libvirt-qemu/$user/" "$here/tmpfiles.d/backup-agent.conf" \
    > "$root/etc/tmpfiles.d/backup-agent.conf"
if [ ! -e "$root/etc/backup-agent/jobs.toml" ]; then
    install -m 0644 "$here/jobs.toml" "$root/etc/backup-agent/jobs.toml"
fi

if [ -z "$root" ]; then
    systemd-tmpfiles --create /etc/tmpfiles.d/backup-agent.conf
    systemctl daemon-reload
fi
echo "installed for QEMU user $user${root:+ below $root}. Next (docs/DEPLOY.md):"
echo "  for each VM: $here/add-vm.sh VM (its own directory and AppArmor rule)"
echo "  edit /etc/backup-agent/jobs.toml, then: backup-agent job check"
echo "  systemctl start backup-agent@NAME.service; journalctl -u backup-agent@NAME"
echo "  systemctl enable --now backup-agent@NAME.timer"
