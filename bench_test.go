package tcpops

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/mholt/caddy-l4/layer4"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

// Benchmarks of the cost tcpops adds, each measured against the same work
// without tcpops in a sibling sub-benchmark (mode=plain and mode=tcpops), so
// that benchstat -col /mode gives the ratio. BENCHMARKS.md has the figures
// and bench/gobench.sh runs them interleaved. The registry and admin listing
// benchmarks are in registry_test.go.

// benchOptions is the configuration the targets name: keepalive,
// lifetime and max_lifetime all set, so that every per-connection path runs.
const benchOptions = `{"keepalive":{"idle":"30s","count":3,"interval":"10s"},"lifetime":"60s","max_lifetime":"1h"}`

// benchHandler returns a provisioned tcpops handler with benchOptions.
func benchHandler(b *testing.B) *Handler {
	b.Helper()
	var h Handler
	if err := json.Unmarshal([]byte(benchOptions), &h); err != nil {
		b.Fatal(err)
	}
	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	b.Cleanup(cancel)
	if err := h.Provision(ctx); err != nil {
		b.Fatal(err)
	}
	// Caddy's default log level is INFO; without a config the context's
	// logger would write every ordinary end at DEBUG.
	h.logger = zap.New(zapcore.NewCore(zapcore.NewJSONEncoder(zap.NewProductionEncoderConfig()),
		zapcore.AddSync(io.Discard), zapcore.InfoLevel))
	return &h
}

// endingConn stands for the client side of a proxied session that has come
// to its end: Read returns EOF and CloseWrite succeeds, as caddy-l4's proxy
// sees them last. NetConn leads tcpops to the real socket under it, so the
// socket options are really set.
type endingConn struct{ *net.TCPConn }

func (endingConn) Read([]byte) (int, error)    { return 0, io.EOF }
func (endingConn) CloseWrite() error           { return nil }
func (c endingConn) NetConn() net.Conn         { return c.TCPConn }
func (endingConn) Write(p []byte) (int, error) { return len(p), nil }

// proxyEnd is the end of a route as caddy-l4's proxy plays it: read the
// client to EOF, then half-close it.
var proxyEnd = layer4.HandlerFunc(func(cx *layer4.Connection) error {
	var b [1]byte
	_, _ = cx.Conn.Read(b[:])
	if cw, ok := cx.Conn.(interface{ CloseWrite() error }); ok {
		_ = cw.CloseWrite()
	}
	return nil
})

// BenchmarkHandle is the per-connection cost of the handler alone: what
// caddy-l4 does with a connection it accepted (wrap it), with (tcpops) and
// without (plain) the tcpops handler in front of the proxy's end of session.
// With tcpops that is: unwrap to the socket, four setsockopt calls, the Conn,
// its registration and lifetime timer, the conid placeholder, and the end
// (timer stopped, unregistered, counted). The socket is one real loopback
// socket, reused; the connection's accept and close are not in the figure.
func BenchmarkHandle(b *testing.B) {
	tc := socketPair(b)
	h := benchHandler(b)
	for _, mode := range []string{"plain", "tcpops"} {
		b.Run("mode="+mode, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				cx := layer4.WrapConnection(endingConn{tc}, nil, zap.NewNop())
				var err error
				if mode == "tcpops" {
					err = h.Handle(cx, proxyEnd)
				} else {
					err = proxyEnd.Handle(cx)
				}
				if err != nil {
					b.Fatal(err)
				}
			}
			b.StopTimer()
			if n := connections.len(); n != 0 {
				b.Fatalf("%d connections still tracked", n)
			}
		})
	}
}

// nullConn is a net.Conn whose Read and Write do nothing, so that the
// wrapper's own cost per call shows.
type nullConn struct{ net.Conn }

func (nullConn) Read(p []byte) (int, error)  { return len(p), nil }
func (nullConn) Write(p []byte) (int, error) { return len(p), nil }

// BenchmarkConnReadWrite is the data path: one Read and one Write through a
// tracked Conn (tcpops) and through the connection itself (plain). On
// nullConn it is the wrapper's own cost; on loopback, 16 KiB each way
// through a real socket, the share of it in a system call.
func BenchmarkConnReadWrite(b *testing.B) {
	for _, under := range []string{"null", "loopback-16KiB"} {
		for _, mode := range []string{"plain", "tcpops"} {
			b.Run(fmt.Sprintf("conn=%s/mode=%s", under, mode), func(b *testing.B) {
				var c net.Conn
				size := 1
				var peer net.Conn
				if under == "null" {
					c = nullConn{}
				} else {
					size = 16 << 10
					c, peer = loopbackPair(b)
				}
				if mode == "tcpops" {
					c = &Conn{Conn: c, start: time.Now()}
				}
				buf := make([]byte, size)
				b.SetBytes(int64(2 * size))
				b.ReportAllocs()
				for b.Loop() {
					if _, err := c.Write(buf); err != nil {
						b.Fatal(err)
					}
					if peer != nil { // echo it back through the kernel
						if _, err := io.ReadFull(peer, buf); err != nil {
							b.Fatal(err)
						}
						if _, err := peer.Write(buf); err != nil {
							b.Fatal(err)
						}
					}
					if _, err := io.ReadFull(c, buf); err != nil {
						b.Fatal(err)
					}
				}
			})
		}
	}
}

// loopbackPair returns both ends of a loopback TCP connection, closed when
// the benchmark ends.
func loopbackPair(b testing.TB) (client, server net.Conn) {
	b.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	if client, err = net.Dial("tcp", ln.Addr().String()); err != nil {
		b.Fatal(err)
	}
	if server, err = ln.Accept(); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = client.Close(); _ = server.Close() })
	return client, server
}

// The benchmark upstream speaks a one-byte protocol, so that one server
// serves every benchmark: the client's first byte chooses what it does.
const (
	upEcho   = 'e' // echo everything after the first byte until EOF
	upSink   = 'u' // discard until EOF, then answer the byte count (8 bytes)
	upSource = 'd' // read an 8-byte count, send that many bytes, close
)

// startBenchUpstream starts the benchmark upstream on loopback. It keeps no
// record of its connections (the harness's upstream does, for tests, and a
// connection-rate run makes hundreds of thousands); it stops accepting when
// the benchmark ends, and each connection ends with its client.
func startBenchUpstream(b *testing.B) string {
	b.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				serveBench(c)
			}()
		}
	}()
	b.Cleanup(func() { _ = ln.Close(); wg.Wait() })
	return ln.Addr().String()
}

// serveBench serves one connection of the benchmark upstream.
func serveBench(c net.Conn) {
	var op [1]byte
	if _, err := io.ReadFull(c, op[:]); err != nil {
		return
	}
	switch op[0] {
	case upEcho: // not io.Copy(c, c), which splices through a pipe per connection
		_, _ = io.CopyBuffer(struct{ io.Writer }{c}, struct{ io.Reader }{c}, make([]byte, 512))
	case upSink:
		n, _ := io.Copy(io.Discard, c)
		_, _ = c.Write(appendUint64(nil, uint64(n)))
	case upSource:
		var cnt [8]byte
		if _, err := io.ReadFull(c, cnt[:]); err != nil {
			return
		}
		_, _ = io.CopyN(c, zeroReader{}, int64(readUint64(cnt[:])))
	}
}

type zeroReader struct{}

func (zeroReader) Read(p []byte) (int, error) { clear(p); return len(p), nil }

func appendUint64(b []byte, v uint64) []byte {
	for i := 7; i >= 0; i-- {
		b = append(b, byte(v>>(8*i)))
	}
	return b
}

func readUint64(b []byte) (v uint64) {
	for _, c := range b[:8] {
		v = v<<8 | uint64(c)
	}
	return v
}

// benchProxies runs Caddy in process with two layer4 servers proxying to
// upstream, the same route with and without tcpops in front of the proxy,
// and returns their addresses by mode.
func benchProxies(b *testing.B, upstream string) map[string]string {
	b.Helper()
	plain, withOps := freePort(b), freePort(b)
	server := func(listen string, handlers ...string) string {
		return fmt.Sprintf(`{"listen":[%q],"routes":[{"handle":[%s]}]}`, listen, joinJSON(handlers))
	}
	tcpops := `{"handler":"tcpops",` + benchOptions[1:]
	loadCaddy(b, fmt.Sprintf(`{"admin":{"disabled":true},"logging":{"logs":{"default":{"level":"ERROR"}}},
"apps":{"layer4":{"servers":{"plain":%s,"tcpops":%s}}}}`,
		server(plain, proxyTo(upstream)), server(withOps, tcpops, proxyTo(upstream))))
	return map[string]string{"plain": plain, "tcpops": withOps}
}

// benchChunk is the size of one write in the throughput benchmarks, and the
// unit b.N counts.
const benchChunk = 64 << 10

// BenchmarkProxyThroughput is bulk transfer through an in-process caddy-l4
// proxy, with and without tcpops in the route, over 1 and 32 streams, client
// to upstream (up: tcpops' Read path) and upstream to client (down: its
// Write path). One op is 64 KiB; the time runs until the last byte arrived.
// Client, Caddy and upstream share this process's cores.
func BenchmarkProxyThroughput(b *testing.B) {
	addrs := benchProxies(b, startBenchUpstream(b))
	for _, dir := range []string{"up", "down"} {
		for _, streams := range []int{1, 32} {
			for _, mode := range []string{"plain", "tcpops"} {
				name := fmt.Sprintf("dir=%s/streams=%d/mode=%s", dir, streams, mode)
				b.Run(name, func(b *testing.B) {
					b.SetBytes(benchChunk)
					transfer(b, addrs[mode], dir, streams, b.N)
				})
			}
		}
	}
	waitRegistryEmpty(b)
}

// transfer moves chunks chunks of benchChunk bytes through the proxy at
// addr in direction dir over streams connections, and waits until every
// byte has arrived.
func transfer(b *testing.B, addr, dir string, streams, chunks int) {
	var next atomic.Int64
	var wg sync.WaitGroup
	errs := make(chan error, streams)
	for range streams {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := transferOne(addr, dir, &next, int64(chunks)); err != nil {
				errs <- err
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		b.Fatal(err)
	}
}

// transferOne is one stream of transfer. Up, it takes chunks from next
// until all are taken; down, it asks for an equal share up front.
func transferOne(addr, dir string, next *atomic.Int64, total int64) error {
	c, err := net.Dial("tcp", addr)
	if err != nil {
		return err
	}
	defer c.Close()
	buf := make([]byte, benchChunk)
	if dir == "down" {
		n := int64(0)
		for next.Add(1) <= total {
			n++
		}
		if _, err := c.Write(appendUint64([]byte{upSource}, uint64(n*benchChunk))); err != nil {
			return err
		}
		got, err := io.CopyBuffer(io.Discard, c, buf)
		if err == nil && got != n*benchChunk {
			err = fmt.Errorf("received %d bytes, want %d", got, n*benchChunk)
		}
		return err
	}
	if _, err := c.Write([]byte{upSink}); err != nil {
		return err
	}
	sent := int64(0)
	for next.Add(1) <= total {
		if _, err := c.Write(buf); err != nil {
			return err
		}
		sent += benchChunk
	}
	if err := c.(*net.TCPConn).CloseWrite(); err != nil {
		return err
	}
	var cnt [8]byte
	if _, err := io.ReadFull(c, cnt[:]); err != nil {
		return fmt.Errorf("reading the upstream's count: %w", err)
	}
	if got := int64(readUint64(cnt[:])); got != sent {
		return fmt.Errorf("upstream received %d bytes, want %d", got, sent)
	}
	return nil
}

// BenchmarkProxyConnRate is connections per second through the same two
// proxies: 64 clients at once, each connecting, exchanging 16 bytes with the
// echoing upstream and closing, as fast as they can. One op is one
// connection.
func BenchmarkProxyConnRate(b *testing.B) {
	addrs := benchProxies(b, startBenchUpstream(b))
	for _, mode := range []string{"plain", "tcpops"} {
		b.Run("clients=64/mode="+mode, func(b *testing.B) {
			b.ReportAllocs()
			b.SetParallelism(32) // 64 on 2 cores
			b.RunParallel(func(pb *testing.PB) {
				msg := []byte("e0123456789abcdef")
				buf := make([]byte, len(msg)-1)
				for pb.Next() {
					if err := exchange(addrs[mode], msg, buf); err != nil {
						b.Error(err)
						return
					}
				}
			})
		})
	}
	waitRegistryEmpty(b)
}

// exchange connects to addr, sends msg and reads the echo of all of it but
// its first byte into buf, and closes.
func exchange(addr string, msg, buf []byte) error {
	c, err := net.Dial("tcp", addr)
	if err != nil {
		return err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Write(msg); err != nil {
		return err
	}
	if _, err := io.ReadFull(c, buf); err != nil {
		return err
	}
	if string(buf) != string(msg[1:]) {
		return errors.New("echo mismatch")
	}
	return nil
}
