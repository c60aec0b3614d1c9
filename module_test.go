package tcpops

import (
	"io"
	"testing"
	"time"
)

func TestProxyLifetimeClosesIdleConnection(t *testing.T) {
	up := startUpstream(t, nil)
	addr := freePort(t)
	loadCaddy(t, l4Config(addr, `{"handler":"tcpops","lifetime":"300ms","keepalive":{"idle":"7s","count":4,"interval":"3s"}}`, proxyTo(up.addr())))

	c := dial(t, addr)
	roundTrip(t, c, "hello")
	tc := waitTracked(t, c)
	got := readSockopts(t, tc.tcp)
	if got.keepalive != 1 || got.idle != 7 || got.count != 4 || got.interval != 3 {
		t.Fatalf("socket options: %+v", got)
	}
	took := waitClosed(t, c, 3*time.Second)
	if took < 250*time.Millisecond {
		t.Fatalf("closed after %v, before the 300ms lifetime", took)
	}
	select {
	case <-up.ended:
	case <-time.After(3 * time.Second):
		t.Fatal("upstream connection not closed")
	}
	waitRegistryEmpty(t)
	_ = io.EOF
}
