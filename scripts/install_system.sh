#!/usr/bin/env bash
# System packages flowrl needs besides Python's: a Vulkan driver for ManiSkill/SAPIEN.
#
# SAPIEN opens a Vulkan device even for state observations. Without a GPU, Mesa's software
# driver (lavapipe) provides one, but only Mesa >= 25: Debian 12's own Mesa 22 lavapipe is
# refused ("Failed to find a supported physical device"), so on Debian 12 (bookworm) the
# driver comes from bookworm-backports, enabled by adding that suite to the Suites: line of the
# existing deb822 sources file. Idempotent: does nothing when a new-enough driver is installed.
# Needs root only when something is missing; then it says so and stops.
# FLOWRL_SKIP_SYSTEM_PACKAGES=1: skip all of it (a machine whose GPU driver provides Vulkan).
set -euo pipefail

if [[ -n "${FLOWRL_SKIP_SYSTEM_PACKAGES:-}" ]]; then
    echo "install_system.sh: FLOWRL_SKIP_SYSTEM_PACKAGES is set; installing nothing"
    exit 0
fi

MIN_MESA=25
PACKAGES=(mesa-vulkan-drivers libx11-6)

installed_version() {  # the installed version of package $1, or nothing
    dpkg-query -W -f='${db:Status-Abbrev} ${Version}\n' "$1" 2>/dev/null | awk '$1 == "ii" {print $2}'
}

have_driver() {
    local mesa
    mesa=$(installed_version mesa-vulkan-drivers)
    [[ -n "$mesa" ]] && dpkg --compare-versions "$mesa" ge "$MIN_MESA" && [[ -n "$(installed_version libx11-6)" ]]
}

if ! command -v dpkg-query >/dev/null 2>&1; then
    echo "install_system.sh: this is not a Debian/Ubuntu system; install a Vulkan driver yourself (a GPU driver, or Mesa >= $MIN_MESA lavapipe), then set FLOWRL_SKIP_SYSTEM_PACKAGES=1" >&2
    exit 1
fi

if have_driver; then
    echo "install_system.sh: Vulkan driver present (mesa-vulkan-drivers $(installed_version mesa-vulkan-drivers)); nothing to install"
    exit 0
fi

if [[ "$(id -u)" -ne 0 ]]; then
    echo "install_system.sh: needs root to install ${PACKAGES[*]} (Mesa >= $MIN_MESA, the Vulkan driver ManiSkill needs); rerun as root, e.g. sudo bash scripts/install_system.sh" >&2
    exit 1
fi

codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
export DEBIAN_FRONTEND=noninteractive
if [[ "$codename" == "bookworm" ]]; then
    sources=/etc/apt/sources.list.d/debian.sources
    if [[ ! -f "$sources" ]]; then
        echo "install_system.sh: no $sources (deb822) to add bookworm-backports to; add that suite to your apt sources, then rerun" >&2
        exit 1
    fi
    # the stanza whose Suites: line holds "bookworm" itself (not bookworm-security) gets the suite, once
    if ! grep -Eq '^Suites:.*bookworm-backports' "$sources"; then
        sed -i -E '/^Suites:(.*[[:space:]])?bookworm([[:space:]]|$)/ s/[[:space:]]*$/ bookworm-backports/' "$sources"
    fi
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends -t bookworm-backports "${PACKAGES[@]}"
else
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}"
fi

if ! have_driver; then
    echo "install_system.sh: installed mesa-vulkan-drivers $(installed_version mesa-vulkan-drivers), older than $MIN_MESA; ManiSkill will not find a Vulkan device" >&2
    exit 1
fi
echo "install_system.sh: installed mesa-vulkan-drivers $(installed_version mesa-vulkan-drivers)"
