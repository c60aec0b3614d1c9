package tcpops

import (
	"encoding/json"
	"net/http"
	"strings"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

func init() {
	caddy.RegisterModule(&APIHandler{})
	httpcaddyfile.RegisterHandlerDirective("tcpops_api", parseAPIHandler)
	// Among the handlers that respond, beside Caddy's metrics handler (its
	// model): after basic_auth, forward_auth and the request rewrites, so
	// that they run first, and no user needs an order line.
	httpcaddyfile.RegisterDirectiveOrder("tcpops_api", httpcaddyfile.After, "metrics")
}

// APIHandler is the HTTP handler http.handlers.tcpops_api: the admin API's
// /tcpops/connections endpoints on any Caddy site, as Caddy's metrics
// handler serves the admin endpoint's /metrics. A registrar on another host
// reaches it over HTTPS behind Caddy's own HTTP auth (basic_auth, client
// certificates with tls { client_auth }, remote_ip matchers), while the
// admin endpoint, which can also load a whole new configuration, stays on
// localhost or is off.
//
// It serves requests whose path, after whatever prefix the site strips
// (handle_path), is /tcpops/connections or /tcpops/connections/{id}, with
// the admin API's own code (serveConnections in admin.go): the same
// endpoints, the same checks, the same answers, the same JSON errors. Any
// other path answers 404. It is a terminal handler: it never calls the
// next one.
//
// Every PATCH and DELETE is logged at info level, whatever its outcome,
// with the authenticated user ({http.auth.user.id}, which basic_auth and
// forward_auth set), the subject of a verified client certificate, the
// remote address and the status.
type APIHandler struct {
	// ReadOnly serves GET only: PATCH and DELETE answer 403, saying why,
	// and change nothing. For a monitoring door beside the registrar's.
	ReadOnly bool `json:"read_only,omitempty"`

	logger *zap.Logger
}

// CaddyModule returns the Caddy module information.
func (*APIHandler) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.handlers.tcpops_api",
		New: func() caddy.Module { return new(APIHandler) },
	}
}

// Provision sets up the handler's logger, which records every change made
// through it.
func (h *APIHandler) Provision(ctx caddy.Context) error {
	h.logger = ctx.Logger(h)
	return nil
}

// ServeHTTP answers the request as the admin endpoint would. An error is
// written as Caddy's admin endpoint writes one (a JSON object with an
// "error" field, and its status) and not returned: returned, Caddy's HTTP
// server would answer it with its own error handling, and the answers of
// the two doors would differ.
func (h *APIHandler) ServeHTTP(w http.ResponseWriter, r *http.Request, _ caddyhttp.Handler) error {
	audit := r.Method == http.MethodPatch || r.Method == http.MethodDelete
	logger := h.logger
	if audit {
		// The admin API's own log lines of the change (the conids, the
		// options) then carry who asked too.
		logger = logger.With(requesterFields(r)...)
	}
	var err error
	if rest, ok := strings.CutPrefix(r.URL.Path, adminConnectionsPath); !ok || (rest != "" && rest[0] != '/') {
		err = apiError(http.StatusNotFound,
			"tcpops: no such endpoint %s: tcpops_api serves %s and %s/{id} (the path after any prefix the site strips with handle_path)",
			r.URL.Path, adminConnectionsPath, adminConnectionsPath)
	} else {
		api := adminAPI{logger: logger, door: doorURL(r)}
		err = api.serveConnections(w, r, h.ReadOnly)
	}
	status := http.StatusOK
	if err != nil {
		status = writeAPIError(w, err)
	}
	switch {
	case audit:
		fields := []zap.Field{zap.String("method", r.Method), zap.String("uri", r.RequestURI), zap.Int("status", status)}
		if err != nil {
			fields = append(fields, zap.String("error", err.Error()))
		}
		logger.Info("tcpops_api: "+r.Method+" request", fields...)
	case err != nil:
		lvl := zapcore.DebugLevel
		if status >= 500 {
			lvl = zapcore.ErrorLevel
		}
		logger.Log(lvl, "tcpops_api: request error", zap.String("method", r.Method),
			zap.String("uri", r.RequestURI), zap.Int("status", status), zap.Error(err))
	}
	return nil
}

// requesterFields says who sent r: the user Caddy's HTTP auth
// authenticated ({http.auth.user.id}, empty without one), the subject of
// the client certificate the TLS handshake verified, and the remote
// address (with the client IP Caddy derives from trusted proxies, when it
// differs).
func requesterFields(r *http.Request) []zap.Field {
	var user string
	if repl, ok := r.Context().Value(caddy.ReplacerCtxKey).(*caddy.Replacer); ok {
		user, _ = repl.GetString("http.auth.user.id")
	}
	fields := []zap.Field{zap.String("user", user), zap.String("remote_addr", r.RemoteAddr)}
	if ip, ok := caddyhttp.GetVar(r.Context(), caddyhttp.ClientIPVarKey).(string); ok && ip != "" && !strings.HasPrefix(r.RemoteAddr, ip+":") && !strings.HasPrefix(r.RemoteAddr, "["+ip+"]:") {
		fields = append(fields, zap.String("client_ip", ip))
	}
	if r.TLS != nil && len(r.TLS.VerifiedChains) > 0 && len(r.TLS.PeerCertificates) > 0 {
		fields = append(fields, zap.String("tls_client_subject", r.TLS.PeerCertificates[0].Subject.String()))
	}
	return fields
}

// doorURL is the URL the handler serves r at: the scheme, the host the
// client asked for, and the prefix the site stripped before it (under
// handle_path /edge1/*, .../edge1), so that a change's log line names the
// door that made it.
func doorURL(r *http.Request) string {
	scheme := "http"
	if r.TLS != nil {
		scheme = "https"
	}
	prefix := ""
	if orig, ok := r.Context().Value(caddyhttp.OriginalRequestCtxKey).(http.Request); ok && orig.URL != nil {
		if p, stripped := strings.CutSuffix(orig.URL.Path, r.URL.Path); stripped {
			prefix = p // else rewritten, not stripped: no prefix to name
		}
	}
	return scheme + "://" + r.Host + prefix
}

// writeAPIError writes err as Caddy's admin endpoint does
// (adminHandler.handleError in caddy/admin.go): an error that is not a
// caddy.APIError, or has no status, is a 500; the body is the APIError as
// JSON, {"error": "<message>"}, written by a json.Encoder (so with a
// newline). It returns the status written.
func writeAPIError(w http.ResponseWriter, err error) int {
	apiErr, ok := err.(caddy.APIError)
	if !ok {
		apiErr = caddy.APIError{HTTPStatus: http.StatusInternalServerError, Err: err}
	}
	if apiErr.HTTPStatus == 0 {
		apiErr.HTTPStatus = http.StatusInternalServerError
	}
	if apiErr.Message == "" && apiErr.Err != nil {
		apiErr.Message = apiErr.Err.Error()
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(apiErr.HTTPStatus)
	_ = json.NewEncoder(w).Encode(apiErr) // a failed write means the client went away
	return apiErr.HTTPStatus
}

// parseAPIHandler sets up the handler from the Caddyfile.
func parseAPIHandler(h httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
	ah := new(APIHandler)
	return ah, ah.UnmarshalCaddyfile(h.Dispenser)
}

// UnmarshalCaddyfile sets up the handler from Caddyfile tokens. Syntax:
//
//	tcpops_api [<matcher>] {
//	    read_only
//	}
func (h *APIHandler) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // the directive name
	if d.NextArg() {
		return d.Errf("tcpops_api: takes no arguments; got %q (read_only goes in its block)", d.Val())
	}
	for d.NextBlock(0) {
		switch d.Val() {
		case "read_only":
			if h.ReadOnly {
				return d.Errf("tcpops_api: read_only given twice")
			}
			if d.NextArg() {
				return d.Errf("tcpops_api: read_only takes no value; got %q", d.Val())
			}
			h.ReadOnly = true
		default:
			return d.Errf("tcpops_api: unknown subdirective %q; allowed: read_only", d.Val())
		}
	}
	return nil
}

// Interface guards
var (
	_ caddy.Provisioner           = (*APIHandler)(nil)
	_ caddyhttp.MiddlewareHandler = (*APIHandler)(nil)
	_ caddyfile.Unmarshaler       = (*APIHandler)(nil)
)
