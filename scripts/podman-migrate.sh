#!/usr/bin/env bash
# What an orchestrator does to move a Podman container to another host with ferry as its
# network (ferry-cni) and as CRIU's hook. Podman does the checkpoint and the restore; ferry
# keeps the IP, the MAC, the public address and the TCP connections:
#
#   1. ferry migrate prepare   the destination builds the container's network side, held;
#   2. podman container checkpoint --export --tcp-established  (source)
#        CRIU's network-lock hook runs `ferry action-script`: packets for the container are
#        held at the destination from the instant its tasks are frozen (no drops, no resets);
#   3. the archive is copied to the destination;
#   4. podman container restore --import --tcp-established     (destination)
#        Podman's CNI ADD (IP=, MAC= of the checkpoint) attaches the new namespace to the
#        prepared, held endpoint; CRIU's post-resume hook releases: the held packets are
#        delivered, every host now sends to the destination;
#   5. the source's stopped container is removed.
#   On a failure before the release: ferry migrate abort, and the container is restored on
#   the source from the same archive (its network is still there: the endpoint stays or
#   comes back to the source).
#
# The container must have been started with `--network <a ferry network>` and the annotation
# `org.criu.config=<a CRIU config>` holding `action-script <ferry>` and `network-lock skip`
# (docs/podman.md). The hosts' hook configuration (/etc/ferry/hook.toml) tells the hook its
# gateway and identity.
#
# usage: scripts/podman-migrate.sh CONTAINER DESTINATION_HOST
# environment:
#   SRC_PODMAN   command running podman on the source host       (default: podman)
#   DST_PODMAN   command running podman on the destination host  (default: ssh DEST podman)
#   COPY         command copying a file to the destination: COPY FILE DEST_HOST
#                                                                (default: scp FILE DEST:FILE)
#   FERRY        the ferry CLI, with its gateway and operator identity (default: ferry)
#   WORK_DIR     where the archive is written                    (default: /var/tmp)
#   RESTORE_TRIES  restores tried at the destination before rolling back (default: 2)
set -euo pipefail

container=${1:?usage: podman-migrate.sh CONTAINER DESTINATION_HOST}
to=${2:?usage: podman-migrate.sh CONTAINER DESTINATION_HOST}
SRC_PODMAN=${SRC_PODMAN:-podman}
DST_PODMAN=${DST_PODMAN:-ssh $to podman}
FERRY=${FERRY:-ferry}
WORK_DIR=${WORK_DIR:-/var/tmp}
RESTORE_TRIES=${RESTORE_TRIES:-2}
copy() { if [[ -n "${COPY:-}" ]]; then $COPY "$1" "$to"; else scp -q "$1" "$to:$1"; fi; }
log() { printf '[podman-migrate] %s %s\n' "$(date +%T.%3N)" "$*" >&2; }

ip=$($SRC_PODMAN inspect --format '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "$container")
[[ -n "$ip" ]] || { log "container $container has no IP address on a network"; exit 1; }
archive="$WORK_DIR/ferry-$container-$(date +%s%N).tar"

log "prepare: $container ($ip) → $to"
$FERRY migrate prepare --container "$ip" --to "$to" >/dev/null

rollback() {
  log "rolling back: $1"
  $FERRY migrate abort --container "$ip" >/dev/null || log "abort: the migration may already be aborted"
  if [[ -f "$archive" ]] && ! $SRC_PODMAN container inspect --format '{{.State.Running}}' "$container" 2>/dev/null | grep -qx true; then
    $SRC_PODMAN rm -f "$container" >/dev/null 2>&1 || true
    $SRC_PODMAN container restore --import "$archive" --tcp-established >/dev/null \
      && log "the container runs on the source again" \
      || log "restoring on the source failed: the archive $archive is kept"
  fi
  exit 1
}

log "checkpoint (the network is held from CRIU's network-lock)"
$SRC_PODMAN container checkpoint --export "$archive" --tcp-established "$container" >/dev/null \
  || rollback "checkpoint failed (the dump's network-unlock hook already asked for the abort)"
log "copy $(stat -c %s "$archive") bytes"
copy "$archive" || rollback "copy failed"
log "restore on $to (released at CRIU's post-resume)"
# A restore that fails (CRIU, the runtime) leaves the migration prepared and the network held:
# the destination's half-made copy is removed (its CNI DEL leaves the prepared endpoint) and
# the restore is tried again, up to RESTORE_TRIES times, before rolling back.
for ((try = 1; ; try++)); do
  $DST_PODMAN container restore --import "$archive" --tcp-established >/dev/null && break
  ((try < RESTORE_TRIES)) || rollback "restore failed ($try of $RESTORE_TRIES tries)"
  log "restore failed (try $try of $RESTORE_TRIES): removing the destination's copy, trying again"
  $DST_PODMAN rm -f "$container" >/dev/null 2>&1 || true
done
$FERRY migrate status --container "$ip" >&2 || true
$SRC_PODMAN rm -f "$container" >/dev/null || log "removing the source's stopped container failed"
rm -f "$archive"
log "done: $container runs on $to with $ip"
