package tcpops

import (
	"math"
	"testing"
	"time"
)

// This file tests `caddy tcpops` (command.go): its formatting as pure
// functions, and the command itself against a real in-process Caddy with its
// admin endpoint on a loopback port and on a unix socket.

func TestCommandHumanDuration(t *testing.T) {
	for _, tc := range []struct {
		d    time.Duration
		want string
	}{
		{0, "0s"},
		{1, "1ns"},
		{999, "999ns"},
		{time.Microsecond, "1µs"},
		{4200 * time.Nanosecond, "4.2µs"},
		{25 * time.Microsecond, "25µs"},
		{999_600 * time.Nanosecond, "1ms"}, // rounds up into the next unit
		{time.Millisecond, "1ms"},
		{1500 * time.Microsecond, "1.5ms"},
		{350 * time.Millisecond, "350ms"},
		{999 * time.Millisecond, "999ms"},
		{999_600 * time.Microsecond, "1s"},
		{time.Second, "1s"},
		{4200 * time.Millisecond, "4.2s"},
		{4249 * time.Millisecond, "4.2s"},
		{9960 * time.Millisecond, "10s"},
		{42 * time.Second, "42s"},
		{59600 * time.Millisecond, "1m"},
		{time.Minute, "1m"},
		{62 * time.Second, "1m2s"},
		{62*time.Second + 400*time.Millisecond, "1m2s"},
		{59*time.Minute + 59*time.Second + 600*time.Millisecond, "1h"},
		{time.Hour + 2*time.Minute, "1h2m"},
		{time.Hour + 2*time.Minute + 29*time.Second, "1h2m"},
		{23*time.Hour + 59*time.Minute + 31*time.Second, "1d"},
		{24 * time.Hour, "1d"},
		{27 * time.Hour, "1d3h"},
		{400 * 24 * time.Hour, "400d"},
		{-350 * time.Millisecond, "-350ms"},
		{math.MaxInt64, "106751d23h"},
		{math.MinInt64, "-106751d23h"},
	} {
		if got := humanDuration(tc.d); got != tc.want {
			t.Errorf("humanDuration(%v) = %q, want %q", tc.d, got, tc.want)
		}
	}
}

func TestCommandHumanBytes(t *testing.T) {
	for _, tc := range []struct {
		n    uint64
		want string
	}{
		{0, "0 B"},
		{1, "1 B"},
		{1023, "1023 B"},
		{1024, "1 KiB"},
		{1536, "1.5 KiB"},
		{10188, "9.9 KiB"},
		{10189, "10 KiB"}, // 9.95 KiB rounds to 10
		{512 * 1024, "512 KiB"},
		{1024*1024 - 1, "1 MiB"},
		{3355443, "3.2 MiB"},
		{120 << 30, "120 GiB"},
		{math.MaxUint64, "16 EiB"},
	} {
		if got := humanBytes(tc.n); got != tc.want {
			t.Errorf("humanBytes(%d) = %q, want %q", tc.n, got, tc.want)
		}
	}
}
