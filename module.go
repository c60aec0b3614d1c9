// Package tcpops brings Kamailio's tcpops to Caddy: per-connection control of
// TCP keepalive, TCP_USER_TIMEOUT, an inactivity lifetime and a maximum
// lifetime, applied to the real socket of each connection a caddy-l4 route
// (layer4.handlers.tcpops) or a Caddy listener (caddy.listeners.tcpops) hands
// it.
package tcpops

import (
	"fmt"

	"github.com/caddyserver/caddy/v2"
)

func init() {
	caddy.RegisterModule(&Handler{})
}

// Handler is the layer4 handler layer4.handlers.tcpops. For each connection
// its route matches it applies Options to the connection's socket and starts
// the connection's lifetime timers, then calls the next handler. A second
// tcpops on the same connection (a later route, or later in the same route)
// updates the first one's settings instead of stacking: Kamailio's "raise the
// lifetime once the client has authenticated".
type Handler struct {
	Options

	tracker
}

// CaddyModule returns the Caddy module information.
func (*Handler) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "layer4.handlers.tcpops",
		New: func() caddy.Module { return new(Handler) },
	}
}

// Provision validates the configuration and sets up logging.
func (h *Handler) Provision(ctx caddy.Context) error {
	if err := h.validateRoute(); err != nil {
		return err
	}
	return h.tracker.provision(ctx, h, &h.Options)
}

// Validate checks the configuration; Provision has already done so, and this
// keeps `caddy validate` honest for configs built by hand.
func (h *Handler) Validate() error {
	if err := h.Options.Validate(); err != nil {
		return err
	}
	return h.validateRoute()
}

// validateRoute refuses what a caddy-l4 route cannot do. max_lifetime_grace
// bounds how long an HTTP connection past its max_lifetime waits for its
// requests in flight; caddy-l4 sees bytes, not requests, so there is
// nothing to wait for, and a route's max_lifetime closes the connection
// when it is reached. Taking the field silently would promise a drain that
// never happens.
func (h *Handler) validateRoute() error {
	if g := h.MaxLifetimeGrace; g.IsSet() {
		return fmt.Errorf("tcpops: max_lifetime_grace %v: not available in a layer4 route: caddy-l4 routes have no requests to wait for, "+
			"so max_lifetime closes the connection when it is reached; max_lifetime_grace is for the listener wrapper "+
			"(caddy.listeners.tcpops) of an HTTP server", g)
	}
	return nil
}

// UnmarshalJSON decodes the handler's JSON strictly, as Caddy does, and
// with the checks of checkOptionsJSON.
func (h *Handler) UnmarshalJSON(b []byte) error {
	type plain Handler // the same fields, without this method
	return unmarshalOptionsJSON(b, (*plain)(h))
}
