package tcpops

import (
	"crypto/tls"
	"encoding/json"
	"net"
	"slices"
	"sync"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"
)

func init() {
	caddy.RegisterModule(&ListenerWrapper{})
}

// ListenerWrapper is the listener wrapper caddy.listeners.tcpops. It applies
// its Options to every TCP connection its listener accepts, for any Caddy
// server that takes listener_wrappers (the HTTP servers, and caddy-l4's
// layer4 listener wrapper chain in them). It is the handler's
// implementation behind a listener: the same options, validation, timers
// and registry, so each connection gets a conid and is visible to the admin
// API.
//
// Unlike the handler, which runs per route, it applies to all connections of
// the listener, before any routing. The server that accepts the connection
// owns its end: tracking ends when that server closes the connection (its
// idle timeout, a finished or hijacked-and-closed request, a shutdown), or
// when a lifetime expires first and tcpops closes it.
//
// In an HTTP server that speaks HTTP/2 over TLS, put it after the tls
// placeholder in listener_wrappers (or leave tls out, which puts TLS
// first): there it sees HTTP/2's frames and closes such connections with a
// GOAWAY (h2close.go); the connection's TLS state stays visible to Caddy
// through ConnectionState. Before tls it sees TLS records, and Provision
// warns. Before or after proxy_protocol, it works: before, it skips the
// PROXY header to find HTTP/2's preface. Put it before http_redirect, whose
// connections cannot be seen through.
//
// Caddy's server-wide keepalive_idle, keepalive_interval and keepalive_count
// are set by the listener itself, before any wrapper runs, so the values in
// these Options override them for the options they set; the rest keep the
// server's values.
type ListenerWrapper struct {
	Options

	tracker

	warnOpaqueHTTP sync.Once
}

// CaddyModule returns the Caddy module information.
func (*ListenerWrapper) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "caddy.listeners.tcpops",
		New: func() caddy.Module { return new(ListenerWrapper) },
	}
}

// Provision validates the configuration and sets up logging. In an HTTP
// server, it also registers for the server's reports on its connections'
// requests (httpstate.go): while the HTTP app provisions a server's listener
// wrappers, the provisioning context carries that server
// (caddyhttp.ServerCtxKey, app.go), and the callbacks registered with
// RegisterConnState are bound to Go's http.Server when the app starts.
func (lw *ListenerWrapper) Provision(ctx caddy.Context) error {
	if err := lw.tracker.provision(ctx, lw, &lw.Options); err != nil {
		return err
	}
	if srv, ok := ctx.Value(caddyhttp.ServerCtxKey).(*caddyhttp.Server); ok && srv != nil {
		lw.tracker.http = true
		srv.RegisterConnState(lw.connState)
		if tlsRecordsOnly(srv) {
			lw.logger.Warn("tcpops: placed before tls in listener_wrappers of a server that speaks HTTP/2 over TLS, tcpops sees TLS records, "+
				"not HTTP/2 frames: it closes such connections without the GOAWAY and PING that let HTTP/2 and gRPC clients move on without losing a request; "+
				"put tcpops after tls (or leave tls out of listener_wrappers, which puts it first), or for idle HTTP/2 use the server's idle_timeout, which sends GOAWAY",
				zap.Strings("listen", srv.Listen))
		}
	}
	return nil
}

// tlsRecordsOnly reports whether, in srv, tcpops sits before the tls
// placeholder in listener_wrappers on a server that serves TLS and may
// negotiate HTTP/2 over it: tcpops then sees TLS records and cannot write
// HTTP/2 frames (h2close.go). While the HTTP app provisions the wrappers,
// ListenerWrappersRaw still holds their JSON (caddy.Context.LoadModule
// clears it after), and its automatic HTTPS has already added the TLS
// connection policies (app.go, automaticHTTPSPhase1).
func tlsRecordsOnly(srv *caddyhttp.Server) bool {
	if len(srv.TLSConnPolicies) == 0 {
		return false
	}
	if len(srv.Protocols) > 0 && !slices.Contains(srv.Protocols, "h2") {
		return false
	}
	ours, tlsAt := -1, -1
	for i, raw := range srv.ListenerWrappersRaw {
		var w struct {
			Wrapper string `json:"wrapper"`
		}
		if json.Unmarshal(raw, &w) != nil {
			continue
		}
		switch {
		case w.Wrapper == "tcpops" && ours < 0:
			ours = i
		case w.Wrapper == "tls":
			tlsAt = i
		}
	}
	return ours >= 0 && tlsAt > ours
}

// Validate checks the configuration; Provision has already done so, and this
// keeps `caddy validate` honest for configs built by hand.
func (lw *ListenerWrapper) Validate() error { return lw.Options.Validate() }

// UnmarshalJSON decodes the wrapper's JSON strictly, as Caddy does, and
// with the checks of checkOptionsJSON.
func (lw *ListenerWrapper) UnmarshalJSON(b []byte) error {
	type plain ListenerWrapper // the same fields, without this method
	return unmarshalOptionsJSON(b, (*plain)(lw))
}

// UnmarshalCaddyfile sets up the listener wrapper from Caddyfile tokens, with
// the handler's syntax (see Handler.UnmarshalCaddyfile):
//
//	servers {
//		listener_wrappers {
//			tcpops {
//				keepalive <idle> <count> <interval>
//				user_timeout <duration>|off
//				lifetime <duration>|off
//				max_lifetime <duration>|off
//				max_lifetime_jitter <percent>
//				max_lifetime_grace <duration>|off
//				events on|off
//				stats_period <duration>|off
//			}
//			tls
//		}
//	}
func (lw *ListenerWrapper) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	return lw.Options.unmarshalCaddyfile(d)
}

// WrapListener returns ln with tcpops applied to each accepted connection.
func (lw *ListenerWrapper) WrapListener(ln net.Listener) net.Listener {
	return &trackingListener{Listener: ln, tracker: &lw.tracker}
}

// trackingListener tracks every connection its wrapped listener accepts.
type trackingListener struct {
	net.Listener
	tracker *tracker
}

// Accept accepts the next connection and tracks it. What tcpops cannot do
// to a connection (not TCP, an opaque wrapper, a socket option the kernel
// refuses) is logged, and the connection is served anyway: Accept only
// fails when the wrapped listener does.
func (l *trackingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	conn, isNew := l.tracker.track(c)
	if !isNew {
		return c, nil // untracked, or already tracked by an earlier tcpops
	}
	var tracked net.Conn = conn
	if conn.http != nil {
		tracked = httpConn{conn}
	}
	if cs, ok := c.(connectionStater); ok {
		return tlsTrackedConn{tracked, cs}, nil
	}
	return tracked, nil
}

// connectionStater is what Caddy's HTTP server (and net/http) look for to
// learn a connection's TLS state: *tls.Conn, or caddy-l4's connection after
// its tls handler.
type connectionStater interface {
	ConnectionState() tls.ConnectionState
}

// tlsTrackedConn is a tracked connection that was already TLS when tcpops
// saw it (tcpops after tls in listener_wrappers). It keeps the connection's
// TLS state visible: Caddy's HTTP server takes a listener-wrapped connection
// for TLS, and fills in the request's TLS state, only through
// ConnectionState. A plain *Conn must not have that method, or Caddy would
// take every connection for TLS.
type tlsTrackedConn struct {
	net.Conn                  // the tracked connection: a *Conn, or an httpConn
	tls      connectionStater // the TLS connection it wraps
}

// ConnectionState returns the TLS state of the wrapped connection.
func (c tlsTrackedConn) ConnectionState() tls.ConnectionState {
	return c.tls.ConnectionState()
}

// NetConn returns the tracked Conn, so that unwrapping finds it.
func (c tlsTrackedConn) NetConn() net.Conn { return c.Conn }

// Interface guards
var (
	_ caddy.Provisioner     = (*ListenerWrapper)(nil)
	_ caddy.Validator       = (*ListenerWrapper)(nil)
	_ caddy.ListenerWrapper = (*ListenerWrapper)(nil)
	_ caddyfile.Unmarshaler = (*ListenerWrapper)(nil)
	_ connectionStater      = tlsTrackedConn{}
)
