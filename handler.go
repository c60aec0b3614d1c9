package tcpops

import (
	"encoding/json"
	"net"

	"github.com/caddyserver/caddy/v2"
	"github.com/mholt/caddy-l4/layer4"
)

// ConnIDReplKey is the placeholder holding the connection's tcpops id,
// {l4.tcpops.conid}, for logs and later handlers.
const ConnIDReplKey = "l4.tcpops.conid"

// Handle applies the options to the connection, then calls next.
//
// When the connection ends depends on where tcpops sits. In a route whose
// handlers end in a terminal one (proxy, echo, ...), the session is over
// when next returns. caddy-l4 runs non-terminal routes one after the other,
// not nested, so a tcpops in an earlier route returns before the proxy of a
// later route starts; that connection ends when its session does (the
// peer's side read to the end and the write side shut, as caddy-l4's proxy
// does last), when it is closed, when a lifetime expires, or at the latest
// when the registry's sweep finds its socket closed. When caddy-l4 runs as a
// listener wrapper and hands the connection on to an HTTP server, it ends
// when that server closes it.
func (h *Handler) Handle(cx *layer4.Connection, next layer4.Handler) error {
	conn, isNew := h.track(cx.Conn)
	if conn == nil {
		return next.Handle(cx)
	}
	// Every handler after this one sees the id, also on a connection an
	// earlier tcpops (a route before, or the listener wrapper) tracked.
	cx.Replacer().Set(ConnIDReplKey, conn.id)
	if !isNew {
		return next.Handle(cx)
	}
	cx.Conn = conn
	if ln, ok := cx.Context.Value(caddy.CtxKey("listener")).(net.Listener); ok {
		conn.setListen(ln.Addr()) // only caddy-l4's listener wrapper says which listener
	}
	err := next.Handle(cx)
	// An error ends routing, and the server closes the connection: this
	// side's end, unless the peer's first move said otherwise. A session
	// whose client side was read to its end, or that a terminal handler
	// half-closed (caddy-l4's proxy does, last, whatever stopped its copy:
	// the client's EOF, the upstream's end, or a write to the upstream
	// that failed inside its io.TeeReader, which reads on no further and
	// leaves no read error here), is over: the server closes it next. So
	// is one whose writes a tls handler after this one stopped for good
	// with its close_notify, the TLS half-close (Conn.SetWriteDeadline).
	// Otherwise routing goes on (a non-terminal route), and caddy-l4
	// closes the raw socket when it is over, or hands the connection to an
	// HTTP server after the routes (that error, "hijacked connection",
	// never passes through a handler): the sweep watches for the raw
	// socket closing behind tcpops' back.
	switch {
	case err != nil:
		conn.end(ReasonClosed, CauseError)
	case conn.readDone.Load() || conn.writeShut.Load() || conn.writesStopped():
		conn.end(ReasonClosed, CauseEOF)
	default:
		connections.watch(conn)
	}
	return err
}

// Interface guards
var (
	_ caddy.Provisioner  = (*Handler)(nil)
	_ caddy.Validator    = (*Handler)(nil)
	_ caddy.CleanerUpper = (*Handler)(nil) // the tracker's, in events.go
	_ layer4.NextHandler = (*Handler)(nil)
	_ json.Unmarshaler   = (*Handler)(nil) // module.go
)
