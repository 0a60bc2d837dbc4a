#!/bin/sh
# add-vm.sh: give one VM its own directory for backup-agent, reachable by that VM's QEMU and
# no other's (docs/DEPLOY.md, step 2). Run it as root once per VM, after install.sh.
#
#   deploy/add-vm.sh [--user USER] [--uuid UUID] [--root DIR] VM
#
# VM           the libvirt domain (or Proxmox VE VM id); also the job's name in jobs.toml
# --user USER  the user QEMU runs as (default as install.sh: libvirt-qemu, else root)
# --uuid UUID  the domain's UUID (default: virsh domuuid VM)
# --root DIR   work below DIR and touch nothing running (for packaging and tests)
#
# It does two things:
# 1. /etc/tmpfiles.d/backup-agent-VM.conf makes /run/backup-agent/VM (mode 0700, QEMU's user)
#    now and at every boot, before the VM starts. The VM's QMP monitor for the agent goes
#    there (-qmp unix:/run/backup-agent/VM/qmp.sock,...), and so does, while it runs,
#    backup-agent@VM's runtime directory /run/backup-agent/VM/job with the agent's sockets.
# 2. AppArmor (libvirt on Debian and Ubuntu confines each VM's QEMU in a profile of its own,
#    /etc/apparmor.d/libvirt/libvirt-UUID): it adds that directory to this VM's profile only,
#    and reloads it. Rules in the abstraction every VM shares (abstractions/libvirt-qemu)
#    would let one VM's QEMU reach another VM's monitor, its copy-before-write target and
#    its snapshot export: an earlier rule of ours there is removed. libvirt creates the
#    profile at the VM's first start and keeps it (libvirt 9.0 removes only its .files
#    part when the VM stops): start the VM once before running this.
set -eu

root=
user=
uuid=
vm=
while [ $# -gt 0 ]; do
    case $1 in
        --user) user=${2:?--user needs a user name}; shift 2 ;;
        --uuid) uuid=${2:?--uuid needs the domain UUID}; shift 2 ;;
        --root) root=${2:?--root needs a directory}; shift 2 ;;
        -*) echo "usage: $0 [--user USER] [--uuid UUID] [--root DIR] VM" >&2; exit 2 ;;
        *) [ -z "$vm" ] || { echo "add-vm.sh: one VM at a time" >&2; exit 2; }
           vm=$1; shift ;;
    esac
done
case $vm in
    '' | . | .. | *[!A-Za-z0-9_.-]*)
        echo "add-vm.sh: bad VM name: '$vm' (letters, digits, _ . - only)" >&2; exit 2 ;;
esac
if [ -z "$user" ]; then
    if getent passwd libvirt-qemu >/dev/null; then user=libvirt-qemu; else user=root; fi
fi
case $user in
    '' | *[!A-Za-z0-9_.-]*) echo "add-vm.sh: bad user name: $user" >&2; exit 2 ;;
esac

dir=/run/backup-agent/$vm
conf=$root/etc/tmpfiles.d/backup-agent-$vm.conf
install -d -m 0755 "$root/etc/tmpfiles.d"
printf '# written by deploy/add-vm.sh: VM %s'"'"'s own directory for backup-agent\nd %s 0700 %s - -\n' \
    "$vm" "$dir" "$user" > "$conf"
if [ -z "$root" ]; then
    systemd-tmpfiles --create "$conf"
fi
echo "$dir: the VM's QMP monitor for the agent is -qmp unix:$dir/qmp.sock,server=on,wait=off"

aa=$root/etc/apparmor.d
shared=$aa/local/abstractions/libvirt-qemu
if [ -f "$shared" ] && grep -q '^/run/backup-agent/\*\* rwk,$' "$shared"; then
    sed -i '\|^/run/backup-agent/\*\* rwk,$|d' "$shared"
    echo "removed the rule for /run/backup-agent that every VM shared from $shared"
    # A VM picks the change up at its next start.
fi
if [ ! -d "$aa/libvirt" ]; then
    echo "no libvirt AppArmor profiles here ($aa/libvirt): nothing more to do"
    exit 0
fi
if [ -z "$uuid" ]; then
    uuid=$(virsh --connect qemu:///system domuuid "$vm") || {
        echo "add-vm.sh: no libvirt domain $vm (give its UUID with --uuid)" >&2; exit 1; }
    uuid=$(echo "$uuid" | tr -d '[:space:]')
fi
case $uuid in
    *[!0-9a-f-]* | '') echo "add-vm.sh: bad UUID: $uuid" >&2; exit 2 ;;
esac
profile=$aa/libvirt/libvirt-$uuid
if [ ! -f "$profile" ]; then
    echo "add-vm.sh: $profile does not exist yet: start the VM once (libvirt creates it)," \
        "then run this again" >&2
    exit 1
fi
marker="# backup-agent: VM $vm's own directory"
if ! grep -qF "$marker" "$profile"; then
    rules="  $marker (deploy/add-vm.sh), for its QMP monitor and the agent's sockets\\n"
    rules="$rules  \"$dir/\" r,\\n  \"$dir/**\" rw,"
    tmp=$profile.backup-agent.tmp
    # Before the profile's last closing brace.
    awk -v rules="$rules" '{ line[NR] = $0 } /^}/ { last = NR }
        END { for (i = 1; i <= NR; i++) { if (i == last) print rules; print line[i] } }' \
        "$profile" > "$tmp"
    grep -qF "$marker" "$tmp" || { rm -f "$tmp"; echo "add-vm.sh: no closing brace in $profile" >&2; exit 1; }
    mv "$tmp" "$profile"
    echo "added $dir to $profile (this VM's AppArmor profile only)"
fi
if [ -z "$root" ] && [ -d /sys/kernel/security/apparmor ]; then
    apparmor_parser -r "$profile"
fi
