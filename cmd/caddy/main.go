// Command caddy is Caddy with caddy-l4 and the tcpops plugin built in, the
// same binary as `xcaddy build --with github.com/tcpops/caddy-tcpops`.
package main

import (
	caddycmd "github.com/caddyserver/caddy/v2/cmd"

	_ "github.com/caddyserver/caddy/v2/modules/standard"
	_ "github.com/mholt/caddy-l4"
	_ "github.com/tcpops/caddy-tcpops"
)

func main() {
	caddycmd.Main()
}
