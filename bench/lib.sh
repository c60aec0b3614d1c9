# Shared by bench/run.sh and bench/compare.sh, which source it.

# The tcpops options of the measurements (issue 7's): keepalive, lifetime
# and max_lifetime set.
tcpops_options='"keepalive":{"idle":"30s","count":3,"interval":"10s"},"max_lifetime":"1h"'

# caddy_config ADMIN LOG UPSTREAM PLAIN TCPOPS [EXPIRE LIFETIME] prints the
# JSON config of one Caddy: the same caddy-l4 proxy route to UPSTREAM
# without tcpops on PLAIN, behind tcpops (lifetime 60s) on TCPOPS and, when
# EXPIRE is given, behind tcpops with a lifetime of LIFETIME on EXPIRE.
# Logs at INFO, as JSON, to the file LOG.
caddy_config() {
	local admin=$1 log=$2 up=$3 plain=$4 tcpops=$5 expire=${6:-} lifetime=${7:-}
	local proxy="{\"handler\":\"proxy\",\"upstreams\":[{\"dial\":[\"$up\"]}]}"
	local more=""
	if [[ -n $expire ]]; then
		more=",
    \"expire\": {\"listen\": [\"$expire\"], \"routes\": [{\"handle\": [{\"handler\": \"tcpops\", $tcpops_options, \"lifetime\": \"$lifetime\"}, $proxy]}]}"
	fi
	cat <<JSON
{
  "admin": {"listen": "$admin"},
  "logging": {"logs": {"default": {
    "writer": {"output": "file", "filename": "$log"},
    "encoder": {"format": "json"}, "level": "INFO"}}},
  "apps": {"layer4": {"servers": {
    "plain":  {"listen": ["$plain"],  "routes": [{"handle": [$proxy]}]},
    "tcpops": {"listen": ["$tcpops"], "routes": [{"handle": [{"handler": "tcpops", $tcpops_options, "lifetime": "60s"}, $proxy]}]}$more
  }}}
}
JSON
}

# wait_port waits up to 10 seconds for something to listen on host:port.
wait_port() {
	for _ in $(seq 100); do
		if (exec 3<>"/dev/tcp/${1%:*}/${1#*:}") 2>/dev/null; then return 0; fi
		sleep 0.1
	done
	echo "nothing listening on $1" >&2
	return 1
}
