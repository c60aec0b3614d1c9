package tcpops

import (
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"net/url"
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
// with the user (User: {http.auth.user.id}, which basic_auth sets, by
// default), the subject of a verified client certificate, the remote
// address, the URI as the client sent it and as the handler saw it, and
// the status.
//
// A web page cannot drive it (DNS rebinding, cross-site requests): a
// request a browser sent (an Origin, Referer or Sec-Fetch-* header) is
// refused with 403 unless its origin is listed in Origins, and over plain
// HTTP a Host that is not an IP address, localhost or a listed origin's is
// refused too, as Caddy's admin endpoint checks Host and Origin.
type APIHandler struct {
	// ReadOnly serves GET only: PATCH and DELETE answer 403, saying why,
	// and change nothing. For a monitoring door beside the registrar's.
	ReadOnly bool `json:"read_only,omitempty"`

	// User is where the audit line takes the user who asked from: a
	// placeholder, evaluated for each request. Default
	// {http.auth.user.id}, which basic_auth sets; behind forward_auth,
	// whose auth server names the user in a response header that
	// copy_headers copies onto the request (deleting any the client sent),
	// use that header: {http.request.header.Remote-User}.
	User string `json:"user,omitempty"`

	// Origins are the web origins (scheme://host[:port], as a browser
	// writes its Origin header) whose pages may use the door. A request
	// from a browser, told by its Origin, Referer or Sec-Fetch-* header,
	// is refused with 403 unless its origin is listed; the registrar's
	// clients (curl, Kamailio's http_client, caddy tcpops) send none of
	// them. Over plain HTTP, where a page can rebind its own name to this
	// server's address, the Host of a request must also be an IP address,
	// localhost or the host of a listed origin. Default: none.
	Origins []string `json:"origins,omitempty"`

	origins []*url.URL
	logger  *zap.Logger
}

// defaultAuditUser is the placeholder User defaults to: the user Caddy's
// basic_auth authenticated.
const defaultAuditUser = "{http.auth.user.id}"

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
	if h.User == "" {
		h.User = defaultAuditUser
	}
	if err := checkAuditUser(h.User); err != nil {
		return err
	}
	h.origins = h.origins[:0]
	for i, o := range h.Origins {
		u, err := parseDoorOrigin(o)
		if err != nil {
			return fmt.Errorf("tcpops_api: origins[%d] %w", i, err)
		}
		h.origins = append(h.origins, u)
	}
	return nil
}

// checkAuditUser refuses a user that names no placeholder: a fixed text
// would name the same user on every audit line, whoever asked.
func checkAuditUser(user string) error {
	open := strings.Index(user, "{")
	if open < 0 || !strings.Contains(user[open:], "}") {
		return fmt.Errorf("tcpops_api: user %q: want a placeholder such as %s or {http.request.header.Remote-User}", user, defaultAuditUser)
	}
	return nil
}

// parseDoorOrigin checks one of Origins: an http or https origin as a
// browser writes it in its Origin header, scheme://host[:port], with
// nothing else. "*" and "null" are refused: the one would let every page
// in, and the other is what a browser sends for a sandboxed or local page.
func parseDoorOrigin(o string) (*url.URL, error) {
	u, err := url.Parse(o)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || u.User != nil ||
		(u.Path != "" && u.Path != "/") || u.RawQuery != "" || u.ForceQuery || u.Fragment != "" {
		return nil, fmt.Errorf("%q: want an origin as a browser writes it, http:// or https:// and host[:port] (as http://localhost:8080), with no path, query or credentials", o)
	}
	u.Path = ""
	return u, nil
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
		logger = logger.With(requesterFields(r, h.User)...)
	}
	err := h.checkBrowser(r)
	rest, ok := strings.CutPrefix(r.URL.Path, adminConnectionsPath)
	switch {
	case err != nil:
		// Refused before anything else is looked at.
	case !ok || (rest != "" && rest[0] != '/'):
		err = apiError(http.StatusNotFound,
			"tcpops: no such endpoint %s: tcpops_api serves %s and %s/{id} (the path after any prefix the site strips with handle_path)",
			r.URL.Path, adminConnectionsPath, adminConnectionsPath)
	default:
		api := adminAPI{logger: logger, door: doorURL(r)}
		err = api.serveConnections(w, r, h.ReadOnly)
	}
	status := http.StatusOK
	if err != nil {
		status = writeAPIError(w, err)
	}
	switch {
	case audit:
		fields := []zap.Field{zap.String("method", r.Method), zap.String("uri", r.RequestURI)}
		// Behind handle_path or a rewrite, uri is what this handler was
		// given; orig_uri is what the client sent.
		if orig, ok := r.Context().Value(caddyhttp.OriginalRequestCtxKey).(http.Request); ok {
			fields = append(fields, zap.String("orig_uri", orig.RequestURI))
		}
		fields = append(fields, zap.Int("status", status))
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

// requesterFields says who sent r: the user the placeholder userFrom names
// (User: {http.auth.user.id} by default; empty when it is not set), the
// subject of the client certificate the TLS handshake verified, and the
// remote address (with the client IP Caddy derives from trusted proxies,
// when it differs).
func requesterFields(r *http.Request, userFrom string) []zap.Field {
	var user string
	if repl, ok := r.Context().Value(caddy.ReplacerCtxKey).(*caddy.Replacer); ok {
		user = repl.ReplaceAll(userFrom, "")
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

// checkBrowser refuses, with 403, a request a web page could have made.
//
// A browser marks its requests: Origin on every cross-origin request and
// on a same-origin PATCH or DELETE, Referer unless the page turns it off,
// and Sec-Fetch-* on requests to https and localhost URLs; the
// registrar's clients (curl, Kamailio's http_client, Go's client, caddy
// tcpops) send none of them. Such a request is served only if its origin
// (the Origin header, else the Referer's, else the door's own, for a
// Sec-Fetch-Site: same-origin or none) is listed in Origins.
//
// That does not stop DNS rebinding over plain HTTP: a page whose name the
// attacker resolves to this server sends a same-origin GET with neither
// Origin nor Sec-Fetch-* (Chromium sends Sec-Fetch-* to secure URLs only,
// measured: TestAPIHandlerRefusesBrowser) and no Referer if it asks so.
// What it cannot change is Host, its own name; over https it cannot get
// past the TLS handshake, whose certificate is not for that name. So over
// plain HTTP the Host must be an IP address (a page served from an IP is
// served from this site), localhost, or the host of a listed origin: the
// admin endpoint's Host check, with its default, loopback, widened to IP
// addresses, which no rebinding can forge.
func (h *APIHandler) checkBrowser(r *http.Request) error {
	origin, marked := r.Header.Get("Origin"), false
	switch {
	case origin != "":
		marked = true
	case r.Header.Get("Referer") != "":
		marked = true
		origin = r.Header.Get("Referer")
		if u, err := url.Parse(origin); err == nil && u.Scheme != "" && u.Host != "" {
			origin = u.Scheme + "://" + u.Host
		}
	default:
		for k := range r.Header {
			if strings.HasPrefix(k, "Sec-Fetch-") {
				marked = true
				scheme := "http"
				if r.TLS != nil {
					scheme = "https"
				}
				origin = scheme + "://" + r.Host
				break
			}
		}
	}
	if marked && !h.originListed(origin) {
		return apiError(http.StatusForbidden,
			"tcpops: a request from a web browser (origin %q) is refused: tcpops_api serves browsers only from the origins listed in its origins option, so that no web page can drive it", origin)
	}
	if r.TLS == nil && !marked && !hostIsSafe(r.Host) && !h.hostListed(r.Host) {
		return apiError(http.StatusForbidden,
			"tcpops: Host %q refused: over plain HTTP tcpops_api serves a Host that is an IP address, localhost or the host of one of its origins, so that no web page can reach it by pointing its own name at this server (DNS rebinding); list the name in origins, or use https", r.Host)
	}
	return nil
}

// originListed reports whether origin (scheme://host[:port]) is one of the
// handler's origins; hosts compare without case, as RFC 3986 says.
func (h *APIHandler) originListed(origin string) bool {
	u, err := url.Parse(origin)
	if err != nil {
		return false
	}
	for _, o := range h.origins {
		if o.Scheme == u.Scheme && strings.EqualFold(o.Host, u.Host) && u.Path == "" && u.User == nil {
			return true
		}
	}
	return false
}

// hostListed reports whether host, a Host header, is the host of one of
// the handler's origins.
func (h *APIHandler) hostListed(host string) bool {
	for _, o := range h.origins {
		if strings.EqualFold(o.Host, host) {
			return true
		}
	}
	return false
}

// hostIsSafe reports whether a Host header names this server in a way no
// web page can take over: an IP address or localhost, with or without a
// port.
func hostIsSafe(host string) bool {
	name := host
	if h, _, err := net.SplitHostPort(host); err == nil {
		name = h
	}
	name = strings.TrimSuffix(strings.TrimPrefix(name, "["), "]")
	if strings.EqualFold(name, "localhost") {
		return true
	}
	_, err := netip.ParseAddr(name)
	return err == nil
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
//	    user    <placeholder>
//	    origins <origin...>
//	}
func (h *APIHandler) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // the directive name
	if d.NextArg() {
		return d.Errf("tcpops_api: takes no arguments; got %q (read_only goes in its block)", d.Val())
	}
	for d.NextBlock(0) {
		switch d.Val() {
		case "user":
			if h.User != "" {
				return d.Errf("tcpops_api: user given twice")
			}
			if !d.NextArg() {
				return d.Errf("tcpops_api: user needs a placeholder, such as %s or {http.request.header.Remote-User}", defaultAuditUser)
			}
			h.User = d.Val()
			if d.NextArg() {
				return d.Errf("tcpops_api: user takes one placeholder; got also %q", d.Val())
			}
			if err := checkAuditUser(h.User); err != nil {
				return d.Err(err.Error())
			}
		case "origins":
			args := d.RemainingArgs()
			if len(args) == 0 {
				return d.Errf("tcpops_api: origins needs at least one origin, as http://localhost:8080")
			}
			for _, o := range args {
				if _, err := parseDoorOrigin(o); err != nil {
					return d.Errf("tcpops_api: origins %v", err)
				}
			}
			h.Origins = append(h.Origins, args...)
		case "read_only":
			if h.ReadOnly {
				return d.Errf("tcpops_api: read_only given twice")
			}
			if d.NextArg() {
				return d.Errf("tcpops_api: read_only takes no value; got %q", d.Val())
			}
			h.ReadOnly = true
		default:
			return d.Errf("tcpops_api: unknown subdirective %q; allowed: read_only, user, origins", d.Val())
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
