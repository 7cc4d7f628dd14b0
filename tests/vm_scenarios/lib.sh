# Shared by the VM scenario scripts (sourced; the scripts run as root with the checkout as cwd).
active() { [ "$(systemctl show -p ActiveState --value "$1")" = active ]; }
upto() { # SECONDS COMMAND...: wait (in the test, not in the product) until COMMAND succeeds
  local end=$((SECONDS + $1)); shift
  until "$@"; do [ $SECONDS -ge $end ] && return 1; sleep 0.2; done
}
cg() { echo "/sys/fs/cgroup$(systemctl show -p ControlGroup --value "$1")"; }
scrape() { upto 180 curl -sf -o "$1" http://127.0.0.1:9464/metrics; }
