#!/usr/bin/env bash
# Install the packages of the local SLURM test cluster (Debian/Ubuntu, as root). Idempotent: a
# machine that already has them returns at once. CI: `bash slurm/local-cluster/install.sh`.
set -euo pipefail
PKGS=(slurmctld slurmd slurm-client slurmdbd munge mariadb-server)
BINS=(/usr/sbin/slurmctld /usr/sbin/slurmd /usr/bin/sbatch /usr/sbin/slurmdbd /usr/sbin/munged /usr/sbin/mariadbd)
missing=0
for b in "${BINS[@]}"; do [[ -x $b ]] || missing=1; done
if [[ $missing == 0 ]]; then
  echo "local-cluster/install.sh: slurm, munge and mariadb are already installed"
  exit 0
fi
if [[ $(id -u) != 0 ]]; then
  echo "local-cluster/install.sh: must run as root (apt-get install)" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
# Packages installed with no init system must not try to start services (policy-rc.d 101 = deny).
policy=/usr/sbin/policy-rc.d
created_policy=0
if [[ ! -e $policy ]]; then printf '#!/bin/sh\nexit 101\n' > $policy; chmod +x $policy; created_policy=1; fi
trap '[[ $created_policy == 1 ]] && rm -f $policy' EXIT
if ! apt-cache policy slurmctld 2>/dev/null | grep -q 'Candidate: [0-9]'; then
  apt-get update -qq
fi
t0=$SECONDS
apt-get install -y -qq --no-install-recommends "${PKGS[@]}" >/tmp/ebmscale-slurm-install.log 2>&1 || {
  tail -30 /tmp/ebmscale-slurm-install.log >&2; exit 1; }
echo "local-cluster/install.sh: installed ${PKGS[*]} in $((SECONDS - t0)) s"
