//go:build !linux

package tcpops

import (
	"errors"
	"net"
	"syscall"
	"time"
)

// userTimeoutSupported reports whether TCP_USER_TIMEOUT can be set here.
const userTimeoutSupported = false

// setSocketOptions sets keepalive through Go's portable SetKeepAliveConfig,
// one option per call so that a failure names its option. TCP_USER_TIMEOUT
// is Linux only; Provision has already warned about it.
func setSocketOptions(tc *net.TCPConn, s *socketSettings) []sockoptError {
	var errs []sockoptError
	if s.keepalive == 0 {
		if err := tc.SetKeepAlive(false); err != nil {
			errs = append(errs, sockoptError{Option: "SO_KEEPALIVE", Value: 0, Err: err})
		}
		return errs
	}
	if s.keepalive < 0 {
		return nil
	}
	one := func(name string, v int, cfg net.KeepAliveConfig) {
		cfg.Enable = true
		if err := tc.SetKeepAliveConfig(cfg); err != nil {
			errs = append(errs, sockoptError{Option: name, Value: v, Err: err})
		}
	}
	unchanged := net.KeepAliveConfig{Idle: -1, Interval: -1, Count: -1}
	one("SO_KEEPALIVE", 1, unchanged)
	if s.idle > 0 {
		c := unchanged
		c.Idle = time.Duration(s.idle) * time.Second
		one("TCP_KEEPIDLE", s.idle, c)
	}
	if s.count > 0 {
		c := unchanged
		c.Count = s.count
		one("TCP_KEEPCNT", s.count, c)
	}
	if s.interval > 0 {
		c := unchanged
		c.Interval = time.Duration(s.interval) * time.Second
		one("TCP_KEEPINTVL", s.interval, c)
	}
	return errs
}

// readSocketState is not available off Linux: Go has no portable getter.
func readSocketState(*net.TCPConn) (SocketState, error) {
	return SocketState{}, errors.ErrUnsupported
}

// socketClosedByKernel reports whether the kernel has closed tc's
// connection; it cannot be told without TCP_INFO.
func socketClosedByKernel(*net.TCPConn) bool { return false }

// icmpSoftErrors is empty where the kernel's closing of a socket cannot be
// seen (socketClosedByKernel): such an error is not taken for an abort.
var icmpSoftErrors []syscall.Errno

// sendQueue cannot read the send queue without SIOCOUTQ and TCP_INFO: a
// graceful close then closes at the client's FIN or after the quiet time,
// and the PING's timeout counts from the write (httpstate.go, h2close.go).
func sendQueue(*net.TCPConn) (sendQueueState, bool) { return sendQueueState{}, false }
