package tcpops

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	caddycmd "github.com/caddyserver/caddy/v2/cmd"
	"github.com/spf13/cobra"
)

// This file is how `caddy tcpops` reaches the API: Caddy's admin endpoint,
// found as `caddy stop` finds it, or one or more tcpops_api handlers named
// by --url, with credentials read from the environment or a file.

// Exit statuses of `caddy tcpops`. Caddy's main exits with 1 for any error
// and with the status of a command's exit error above 1, which a command
// makes with caddycmd.WrapCommandFuncForCobra (commandStatus below).
const (
	exitOK = 0
	// exitUsage: a bad flag, argument or value, refused before any request
	// or by the API (400, 405, 409, 413, 415). cobra's own errors (an
	// unknown flag, a flag that does not parse) exit 1 through Caddy's main
	// too.
	exitUsage = 1
	// exitNoMatch: show, set or close found no connection: the API's own
	// 404 for the id or filters sent (call.noMatch), no other. A list that
	// matches nothing is not a failure: it prints the empty answer and
	// exits 0.
	exitNoMatch = 2
	// exitUnreachable: an endpoint could not be reached, did not answer in
	// time, refused the TLS handshake or the credentials (401, 403), failed
	// (5xx), redirected (3xx, never followed), or answered with something
	// that is not the tcpops API's answer to the request.
	exitUnreachable = 3
)

// defaultTimeout bounds each request of the command, answer body included,
// so that an endpoint that accepts and never answers does not hang a
// script.
const defaultTimeout = 10 * time.Second

// authEnv holds user:password for HTTP basic auth toward --url, so that no
// secret is in a flag, which ps shows to every user of the machine.
const authEnv = "TCPOPS_AUTH"

// statusError is an error with the exit status `caddy tcpops` ends with.
type statusError struct {
	status int
	err    error
}

func (e *statusError) Error() string { return e.err.Error() }
func (e *statusError) Unwrap() error { return e.err }

func withStatus(status int, err error) error {
	if err == nil {
		return nil
	}
	return &statusError{status: status, err: err}
}

// exitStatusOf is the exit status for err: its statusError's, else the
// usage status (a bad value, caught before anything was sent).
func exitStatusOf(err error) int {
	var se *statusError
	if errors.As(err, &se) {
		return se.status
	}
	if err == nil {
		return exitOK
	}
	return exitUsage
}

// commandStatus runs a subcommand's work and turns its error into what
// Caddy's main exits with: the error on one line of stderr, as cobra
// prints it ("Error: ..."), and the exit status of exitStatusOf. Caddy's
// main has no other way in for a status above 1 than the exit error of
// WrapCommandFuncForCobra; that also logs an error it is given through
// Caddy's logger, so the error is printed here and not given to it.
func commandStatus(run func(cmd *cobra.Command, args []string) error) func(*cobra.Command, []string) error {
	return func(cmd *cobra.Command, args []string) error {
		err := run(cmd, args)
		if err == nil {
			return nil
		}
		cmd.SilenceErrors = true
		fmt.Fprintln(cmd.ErrOrStderr(), "Error:", oneLine(err.Error()))
		status := exitStatusOf(err)
		if status <= 1 {
			return err
		}
		return caddycmd.WrapCommandFuncForCobra(func(caddycmd.Flags) (int, error) { return status, nil })(cmd, args)
	}
}

// endpointFlags are the flags that say which API the command talks to and
// how.
type endpointFlags struct {
	address, config, adapter string   // the admin endpoint, as caddy stop finds it
	urls                     []string // tcpops_api handlers
	authFile                 string   // user:password, else $TCPOPS_AUTH
	caFile                   string   // PEM roots to trust for https
	certFile, keyFile        string   // a TLS client certificate
	timeout                  string   // per request
}

func (f *endpointFlags) add(cmd *cobra.Command) {
	pf := cmd.PersistentFlags()
	pf.StringVar(&f.address, "address", "", "The address of Caddy's admin endpoint, if not the default (unix//path for a unix socket)")
	pf.StringVarP(&f.config, "config", "c", "", "A config file to read the admin endpoint's address from, if --address is not used")
	pf.StringVarP(&f.adapter, "adapter", "a", "", "The config adapter to use with --config")
	pf.StringArrayVar(&f.urls, "url", nil, "The base URL of a tcpops_api handler instead of the admin endpoint (<url>/tcpops/connections); repeat for several edges")
	pf.StringVar(&f.authFile, "auth-file", "", "A file holding user:password for HTTP basic auth toward --url (else $"+authEnv+")")
	pf.StringVar(&f.caFile, "ca-file", "", "PEM certificates to trust for an https --url, instead of the system's")
	pf.StringVar(&f.certFile, "cert-file", "", "A PEM client certificate for an https --url (with --key-file)")
	pf.StringVar(&f.keyFile, "key-file", "", "The PEM key of --cert-file")
	pf.StringVar(&f.timeout, "timeout", defaultTimeout.String(), "How long each request may take, answer included (a duration; a bare integer is seconds)")
}

// args returns the endpoint flags as given, for a command line to print.
func (f *endpointFlags) args() []string {
	var a []string
	for _, fl := range []struct{ name, v string }{{"address", f.address}, {"config", f.config}, {"adapter", f.adapter}} {
		if fl.v != "" {
			a = append(a, "--"+fl.name, fl.v)
		}
	}
	for _, u := range f.urls {
		a = append(a, "--url", u)
	}
	for _, fl := range []struct{ name, v string }{{"auth-file", f.authFile}, {"ca-file", f.caFile},
		{"cert-file", f.certFile}, {"key-file", f.keyFile}} {
		if fl.v != "" {
			a = append(a, "--"+fl.name, fl.v)
		}
	}
	if f.timeout != defaultTimeout.String() {
		a = append(a, "--timeout", f.timeout)
	}
	return a
}

// endpoints returns the APIs the command talks to: one per --url, or the
// admin endpoint.
func (f *endpointFlags) endpoints() ([]*endpoint, error) {
	timeout, err := parseDuration(f.timeout)
	if err != nil {
		return nil, flagError("timeout", f.timeout, err)
	}
	if timeout <= 0 {
		return nil, fmt.Errorf("--timeout %s: must be more than 0", f.timeout)
	}
	if len(f.urls) == 0 {
		for _, fl := range []struct{ name, v string }{{"auth-file", f.authFile}, {"ca-file", f.caFile},
			{"cert-file", f.certFile}, {"key-file", f.keyFile}} {
			if fl.v != "" {
				return nil, fmt.Errorf("tcpops: --%s is for --url; the admin endpoint takes no credentials", fl.name)
			}
		}
		e, err := f.adminEndpoint()
		if err != nil {
			return nil, err
		}
		e.timeout = timeout
		return []*endpoint{e}, nil
	}
	if f.address != "" || f.config != "" {
		return nil, errors.New("tcpops: give --url or the admin endpoint (--address, --config), not both")
	}
	tr, err := f.tlsTransport()
	if err != nil {
		return nil, err
	}
	auth, err := f.basicAuth()
	if err != nil {
		return nil, err
	}
	var eps []*endpoint
	seen := map[string]bool{}
	for _, raw := range f.urls {
		e, err := urlEndpoint(raw)
		if err != nil {
			return nil, err
		}
		if seen[e.base] {
			return nil, fmt.Errorf("--url %s: given twice", raw)
		}
		seen[e.base] = true
		if auth != nil && strings.HasPrefix(e.base, "http://") && !isLoopbackHost(e.base) {
			// Basic auth is the password itself on the wire.
			return nil, fmt.Errorf("--url %s: the credentials of $%s or --auth-file would cross the network in clear text; use https", raw, authEnv)
		}
		e.client = &http.Client{Transport: tr, CheckRedirect: noRedirect}
		e.auth = auth
		e.timeout = timeout
		eps = append(eps, e)
	}
	return eps, nil
}

// adminEndpoint finds the admin endpoint as `caddy stop` does: --address,
// else the admin address of the --config file, else Caddy's default. It
// makes its requests as caddycmd.AdminAPIRequest does (a unix socket
// dialled under a placeholder host; an Origin the admin endpoint accepts),
// which cannot be given a timeout.
func (f *endpointFlags) adminEndpoint() (*endpoint, error) {
	var cfg []byte
	if f.address == "" && f.config != "" {
		var err error
		if cfg, err = loadConfigQuietly(f.config, f.adapter); err != nil {
			return nil, fmt.Errorf("tcpops: finding the admin endpoint: %s", oneLine(err.Error()))
		}
	}
	addr := caddy.DefaultAdminListen
	var err error
	if f.address != "" || len(cfg) > 0 {
		addr, err = caddycmd.DetermineAdminAPIAddress(f.address, cfg, f.config, f.adapter)
	}
	if err != nil {
		return nil, fmt.Errorf("tcpops: finding the admin endpoint: %s", oneLine(err.Error()))
	}
	na, err := caddy.ParseNetworkAddress(addr)
	if err != nil || na.PortRangeSize() > 1 {
		return nil, fmt.Errorf("tcpops: admin endpoint %s: invalid address: %v", addr, err)
	}
	e := &endpoint{label: addr, admin: true}
	dial := na.JoinHostPort(0)
	if na.IsUnixNetwork() || na.IsFdNetwork() {
		// A unix address may end with the socket's permission bits,
		// "|0222", which are not part of its path.
		dial, _, _ = strings.Cut(na.Host, "|")
		e.base = "http://127.0.0.1"
	} else {
		e.base = "http://" + dial
		e.origin = e.base
	}
	e.client = &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, na.Network, dial)
		},
	}, CheckRedirect: noRedirect}
	return e, nil
}

// loadConfigQuietly reads the config file (or "-", standard input) and
// adapts it as caddycmd.LoadConfig does, with the same choice of adapter
// (--adapter; else the Caddyfile adapter for a file named Caddyfile* or
// *.caddyfile; else JSON), without its log lines: LoadConfig logs "using
// config from file" and "adapted config to JSON" at info level through
// Caddy's default logger, on stderr, which a command cannot quiet, and an
// error is the only thing this command prints there (issue 28). A
// Caddyfile's adapt warnings are not errors of this command either.
func loadConfigQuietly(file, adapter string) ([]byte, error) {
	var cfg []byte
	var err error
	if file == "-" {
		cfg, err = io.ReadAll(os.Stdin)
	} else {
		cfg, err = os.ReadFile(file)
	}
	if err != nil {
		return nil, fmt.Errorf("reading config from %s: %w", file, err)
	}
	base := strings.ToLower(filepath.Base(file))
	if adapter == "" && filepath.Ext(base) != ".json" &&
		(strings.HasPrefix(base, "caddyfile") || strings.HasSuffix(base, ".caddyfile")) {
		adapter = "caddyfile"
	}
	if adapter == "" {
		return cfg, nil
	}
	a := caddyconfig.GetAdapter(adapter)
	if a == nil {
		return nil, fmt.Errorf("unrecognized config adapter: %s", adapter)
	}
	adapted, _, err := a.Adapt(cfg, map[string]any{"filename": file})
	if err != nil {
		return nil, fmt.Errorf("adapting config using %s: %w", adapter, err)
	}
	return adapted, nil
}

// noRedirect stops the client at a redirect, which the command then
// refuses (endpoint.do): Go's client would follow it, carrying the
// Authorization header to the same host name on any scheme or port (so to
// clear-text http), sending a DELETE to a door nobody named, and turning a
// DELETE into a GET on a 302 or 303, whose list answer would read as
// "0 connections closed".
func noRedirect(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }

// urlEndpoint checks a --url: http or https, a host, and no credentials,
// query or fragment. Its path, if any, is the prefix the tcpops_api
// handler is mounted under. Credentials are looked for first, in the text
// as given, so that no message about a URL that also fails to parse or
// has another scheme shows the password.
func urlEndpoint(raw string) (*endpoint, error) {
	if shown, ok := redactURL(raw); ok {
		return nil, fmt.Errorf("--url %s: credentials in a URL are visible to every user (ps); put user:password in $%s or --auth-file", shown, authEnv)
	}
	u, err := url.Parse(raw)
	if err != nil {
		var ue *url.Error
		if errors.As(err, &ue) {
			err = ue.Err // its text repeats the URL
		}
		return nil, flagError("url", raw, err)
	}
	switch {
	case u.Scheme != "http" && u.Scheme != "https":
		return nil, fmt.Errorf("--url %s: want an http:// or https:// URL", raw)
	case u.Host == "":
		return nil, fmt.Errorf("--url %s: no host", raw)
	case u.User != nil:
		return nil, fmt.Errorf("--url %s: credentials in a URL are visible to every user (ps); put user:password in $%s or --auth-file", u.Redacted(), authEnv)
	case u.RawQuery != "" || u.Fragment != "" || u.ForceQuery:
		return nil, fmt.Errorf("--url %s: want a base URL, without a query or fragment", raw)
	}
	base := strings.TrimSuffix(u.Scheme+"://"+u.Host+u.EscapedPath(), "/")
	return &endpoint{label: base, base: base}, nil
}

// redactURL finds credentials in a URL as written, whether or not it
// parses: the userinfo of its authority (before the last "@" ahead of the
// path), or with no "//", anything before an "@" ahead of the first "/".
// It returns the URL with the password, or the whole userinfo when it has
// no colon, replaced by xxxxx (as url.URL.Redacted writes it), and whether
// there were any.
func redactURL(raw string) (string, bool) {
	start := 0
	if i := strings.Index(raw, "//"); i >= 0 {
		start = i + 2
	}
	end := len(raw)
	if i := strings.IndexAny(raw[start:], "/?#"); i >= 0 {
		end = start + i
	}
	at := strings.LastIndex(raw[start:end], "@")
	if at < 0 {
		return raw, false
	}
	at += start
	userinfo := raw[start:at]
	masked := "xxxxx"
	if user, _, ok := strings.Cut(userinfo, ":"); ok {
		masked = user + ":xxxxx"
	}
	return raw[:start] + masked + raw[at:], true
}

// isLoopbackHost reports whether the host of the URL base is a loopback
// address or localhost, where plain http does not leave the machine.
func isLoopbackHost(base string) bool {
	u, err := url.Parse(base)
	if err != nil {
		return false
	}
	h := u.Hostname()
	if h == "localhost" {
		return true
	}
	ip := net.ParseIP(h)
	return ip != nil && ip.IsLoopback()
}

// tlsTransport is the transport for --url: the system's roots or
// --ca-file's, and --cert-file's client certificate.
func (f *endpointFlags) tlsTransport() (*http.Transport, error) {
	cfg := &tls.Config{MinVersion: tls.VersionTLS12}
	if f.caFile != "" {
		pem, err := os.ReadFile(f.caFile)
		if err != nil {
			return nil, fmt.Errorf("--ca-file %s: %v", f.caFile, err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("--ca-file %s: no PEM certificate in it", f.caFile)
		}
		cfg.RootCAs = pool
	}
	if (f.certFile == "") != (f.keyFile == "") {
		return nil, errors.New("tcpops: give --cert-file and --key-file together")
	}
	if f.certFile != "" {
		cert, err := tls.LoadX509KeyPair(f.certFile, f.keyFile)
		if err != nil {
			return nil, fmt.Errorf("--cert-file %s, --key-file %s: %v", f.certFile, f.keyFile, err)
		}
		cfg.Certificates = []tls.Certificate{cert}
	}
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.TLSClientConfig = cfg
	return tr, nil
}

// basicAuth reads user:password from --auth-file, else from $TCPOPS_AUTH;
// nil when neither is given.
func (f *endpointFlags) basicAuth() (*[2]string, error) {
	src, raw := "$"+authEnv, os.Getenv(authEnv)
	if f.authFile != "" {
		b, err := os.ReadFile(f.authFile)
		if err != nil {
			return nil, fmt.Errorf("--auth-file %s: %v", f.authFile, err)
		}
		src = "--auth-file " + f.authFile
		raw, _, _ = strings.Cut(string(b), "\n")
		raw = strings.TrimSuffix(raw, "\r")
	}
	if raw == "" {
		if f.authFile != "" {
			return nil, fmt.Errorf("tcpops: %s is empty: want user:password on its first line", src)
		}
		return nil, nil
	}
	user, pass, ok := strings.Cut(raw, ":")
	if !ok || user == "" {
		// The value is a secret: never echo it.
		return nil, fmt.Errorf("tcpops: %s: want user:password", src)
	}
	return &[2]string{user, pass}, nil
}

// endpoint is one API the command talks to: the admin endpoint, or a
// tcpops_api handler.
type endpoint struct {
	label   string // how messages and the EDGE column name it
	base    string // the URL that adminConnectionsPath is appended to
	origin  string // the Origin header the admin endpoint wants
	admin   bool
	client  *http.Client
	auth    *[2]string
	timeout time.Duration
}

// call is one request of the command, and what tells the API's own "no
// such connection" answer to it apart from every other 404.
type call struct {
	method, path string
	body         []byte
	// noMatch is the API's 404 message that means nothing matched this
	// request (noMatchOf); nil for a list, which answers an empty list.
	noMatch func(msg string) bool
}

// noMatchOfID is the API's 404 for a request about connection id: not
// found, or ended before the request could act on it (admin.go's lookup,
// changeError, handleDelete).
func noMatchOfID(id uint64) func(string) bool {
	conn := fmt.Sprintf("tcpops: connection %d ", id)
	return func(msg string) bool {
		rest, ok := strings.CutPrefix(msg, conn)
		return ok && (rest == "not found" || rest == "ended" ||
			(strings.HasPrefix(rest, "ended (") && strings.HasSuffix(rest, ") before it could be closed")))
	}
}

// noMatchOfFilter is the API's 404 for a PATCH or DELETE by address that
// matched nothing (admin.go's noMatch), for exactly the filters sent.
func noMatchOfFilter(q listQuery) func(string) bool {
	want := "tcpops: no connection matches " + q.String()
	return func(msg string) bool { return msg == want }
}

// do sends one request and returns the body of a 2xx answer. Every failure
// is one line that names the endpoint, with its exit status: the API's own
// message and the HTTP status for an error answer, or what went wrong
// reaching it. A redirect is not followed (noRedirect): it is an error
// that names where it pointed.
func (e *endpoint) do(c call) ([]byte, error) {
	ctx, cancel := context.WithTimeout(context.Background(), e.timeout)
	defer cancel()
	var r io.Reader
	if c.body != nil {
		r = bytes.NewReader(c.body)
	}
	req, err := http.NewRequestWithContext(ctx, c.method, e.base+c.path, r)
	if err != nil {
		return nil, withStatus(exitUsage, fmt.Errorf("tcpops: %s: %v", e.label, err))
	}
	if e.origin != "" {
		req.Header.Set("Origin", e.origin)
	}
	if c.body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	if e.auth != nil {
		req.SetBasicAuth(e.auth[0], e.auth[1])
	}
	// One request per command and endpoint: without "Connection: close"
	// the transport would keep the connection, and two goroutines, around.
	req.Close = true
	resp, err := e.client.Do(req)
	if err != nil {
		return nil, e.transportError(ctx, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode/100 == 3 {
		to := "nowhere (no Location)"
		if loc := resp.Header.Get("Location"); loc != "" {
			to, _ = redactURL(loc)
		}
		return nil, withStatus(exitUnreachable, fmt.Errorf("tcpops: %s answered HTTP %d %s, a redirect to %s, which is not followed: give the URL of the tcpops_api handler itself",
			e.name(), resp.StatusCode, http.StatusText(resp.StatusCode), oneLine(to)))
	}
	b, err := io.ReadAll(io.LimitReader(resp.Body, maxAnswer+1))
	if err != nil {
		return nil, e.transportError(ctx, err)
	}
	if len(b) > maxAnswer {
		return nil, withStatus(exitUnreachable, fmt.Errorf("tcpops: the answer of %s is over %d MiB", e.label, maxAnswer>>20))
	}
	if resp.StatusCode/100 != 2 {
		return nil, e.answerError(resp, b, c)
	}
	return b, nil
}

// maxAnswer bounds an answer: a page of 10,000 connections is about 7 MB.
const maxAnswer = 64 << 20

func (e *endpoint) transportError(ctx context.Context, err error) error {
	if errors.Is(ctx.Err(), context.DeadlineExceeded) {
		return withStatus(exitUnreachable, fmt.Errorf("tcpops: %s did not answer within %v (--timeout)", e.name(), e.timeout))
	}
	var ue *url.Error
	if errors.As(err, &ue) {
		// Its text starts with the method and the URL, whose host is a
		// placeholder for a unix socket: name the endpoint instead.
		err = ue.Err
	}
	return withStatus(exitUnreachable, fmt.Errorf("tcpops: cannot reach %s: %s", e.name(), oneLine(err.Error())))
}

// name is the endpoint as messages name it.
func (e *endpoint) name() string {
	if e.admin {
		return "Caddy's admin endpoint at " + e.label
	}
	return e.label
}

// answerError turns an error answer into one line: the API's message (or
// the start of the body) with the status and the endpoint, and its exit
// status. Only the API's own answer that nothing matched this request is
// exit 2: a 404 of the door ("no such endpoint": a --url with a wrong
// prefix) or of anything else is exit 3, or a close across edges would
// skip the edge that holds the connection without a word.
func (e *endpoint) answerError(resp *http.Response, body []byte, c call) error {
	var apiErr struct {
		Error string `json:"error"`
	}
	msg := ""
	if json.Unmarshal(body, &apiErr) == nil && apiErr.Error != "" {
		msg = oneLine(apiErr.Error)
	}
	code := resp.StatusCode
	where := fmt.Sprintf("(HTTP %d from %s)", code, e.label)
	switch code {
	case http.StatusNotFound:
		if c.noMatch != nil && apiErr.Error != "" && c.noMatch(apiErr.Error) {
			return withStatus(exitNoMatch, fmt.Errorf("%s %s", msg, where))
		}
	case http.StatusBadRequest, http.StatusMethodNotAllowed, http.StatusConflict,
		http.StatusRequestEntityTooLarge, http.StatusUnsupportedMediaType:
		if strings.HasPrefix(msg, "tcpops: ") {
			return withStatus(exitUsage, fmt.Errorf("%s %s", msg, where))
		}
	}
	if msg == "" {
		msg = oneLine(string(body))
		if len(msg) > 200 {
			msg = strings.ToValidUTF8(msg[:200], "") + "..."
		}
	}
	if msg == "" {
		// Caddy's basic_auth answers 401 with an empty body, as do many
		// refusals: the error still says why (issue 28).
		msg = e.emptyAnswerReason(resp)
	}
	hint := ""
	if code == http.StatusNotFound {
		if e.admin {
			hint = " (is the tcpops plugin built into that Caddy?)"
		} else {
			hint = " (is it the base URL of a tcpops_api handler?)"
		}
	}
	return withStatus(exitUnreachable, fmt.Errorf("tcpops: %s answered HTTP %d %s: %s%s",
		e.name(), code, http.StatusText(code), msg, hint))
}

// emptyAnswerReason says what an error answer without a body means, from
// its status and headers, and what to do about it.
func (e *endpoint) emptyAnswerReason(resp *http.Response) string {
	switch code := resp.StatusCode; {
	case code == http.StatusUnauthorized && e.auth == nil:
		asks := ""
		if h := oneLine(resp.Header.Get("WWW-Authenticate")); h != "" {
			asks = " (WWW-Authenticate: " + h + ")"
		}
		return fmt.Sprintf("it asks for credentials%s and none were sent: put user:password in $%s or --auth-file", asks, authEnv)
	case code == http.StatusUnauthorized:
		return fmt.Sprintf("it refused the credentials of $%s or --auth-file", authEnv)
	case code == http.StatusForbidden:
		return "it refused the request without saying why (a remote_ip matcher, or another rule of the site)"
	default:
		return "the answer has no body that says why"
	}
}

// decode decodes an answer b of e to c into v, which must have each of
// the fields keys (present, not null), then runs check on it: an answer
// of another shape, or one that is not about what c asked, is not the
// tcpops API answering c, and is exit 3, never a success.
func (e *endpoint) decode(c call, b []byte, v any, keys []string, check func() error) error {
	err := decodeFields(b, v, keys)
	if err == nil && check != nil {
		err = check()
	}
	if err != nil {
		start := oneLine(string(b))
		if len(start) > 60 {
			start = strings.ToValidUTF8(start[:60], "") + "..."
		}
		return withStatus(exitUnreachable, fmt.Errorf("tcpops: the answer of %s to %s %s is not the tcpops API's (%s): %s",
			e.name(), c.method, c.path, oneLine(err.Error()), start))
	}
	return nil
}

// decodeFields decodes the JSON object b into v and checks that it has
// each of the fields keys, not null: encoding/json leaves a field that is
// missing at its zero value, which would read as an answer.
func decodeFields(b []byte, v any, keys []string) error {
	var fields map[string]json.RawMessage
	if err := json.Unmarshal(b, &fields); err != nil {
		return err
	}
	if err := json.Unmarshal(b, v); err != nil {
		return err
	}
	for _, k := range keys {
		if fields[k] == nil || string(fields[k]) == "null" {
			return fmt.Errorf("no %q", k)
		}
	}
	return nil
}
