//go:build linux

package tcpops

import (
	"net"
	"syscall"

	"golang.org/x/sys/unix"
)

// userTimeoutSupported reports whether TCP_USER_TIMEOUT can be set here.
const userTimeoutSupported = true

// setSocketOptions sets the options in one pass over the descriptor, each
// with its own setsockopt so that a failure names its option.
func setSocketOptions(tc *net.TCPConn, s *socketSettings) []sockoptError {
	rc, err := tc.SyscallConn()
	if err != nil {
		return []sockoptError{{Option: "SyscallConn", Err: err}}
	}
	var errs []sockoptError
	set := func(fd int, level, opt int, name string, v int) {
		if err := unix.SetsockoptInt(fd, level, opt, v); err != nil {
			errs = append(errs, sockoptError{Option: name, Value: v, Err: err})
		}
	}
	cerr := rc.Control(func(fdp uintptr) {
		fd := int(fdp)
		if s.keepalive >= 0 {
			set(fd, unix.SOL_SOCKET, unix.SO_KEEPALIVE, "SO_KEEPALIVE", s.keepalive)
		}
		if s.idle > 0 {
			set(fd, unix.IPPROTO_TCP, unix.TCP_KEEPIDLE, "TCP_KEEPIDLE", s.idle)
		}
		if s.count > 0 {
			set(fd, unix.IPPROTO_TCP, unix.TCP_KEEPCNT, "TCP_KEEPCNT", s.count)
		}
		if s.interval > 0 {
			set(fd, unix.IPPROTO_TCP, unix.TCP_KEEPINTVL, "TCP_KEEPINTVL", s.interval)
		}
		if s.userTimeout >= 0 {
			set(fd, unix.IPPROTO_TCP, unix.TCP_USER_TIMEOUT, "TCP_USER_TIMEOUT", s.userTimeout)
		}
	})
	if cerr != nil {
		errs = append(errs, sockoptError{Option: "RawConn.Control", Err: cerr})
	}
	return errs
}

// readSocketState reads the keepalive options, TCP_USER_TIMEOUT and TCP_INFO
// back from the kernel.
func readSocketState(tc *net.TCPConn) (SocketState, error) {
	var st SocketState
	rc, err := tc.SyscallConn()
	if err != nil {
		return st, err
	}
	var firstErr error
	get := func(fd, level, opt int) *int {
		v, err := unix.GetsockoptInt(fd, level, opt)
		if err != nil {
			if firstErr == nil {
				firstErr = err
			}
			return nil
		}
		return &v
	}
	cerr := rc.Control(func(fdp uintptr) {
		fd := int(fdp)
		if on := get(fd, unix.SOL_SOCKET, unix.SO_KEEPALIVE); on != nil {
			b := *on != 0
			st.Keepalive = &b
		}
		st.KeepaliveIdle = get(fd, unix.IPPROTO_TCP, unix.TCP_KEEPIDLE)
		st.KeepaliveCount = get(fd, unix.IPPROTO_TCP, unix.TCP_KEEPCNT)
		st.KeepaliveInterval = get(fd, unix.IPPROTO_TCP, unix.TCP_KEEPINTVL)
		st.UserTimeoutMillis = get(fd, unix.IPPROTO_TCP, unix.TCP_USER_TIMEOUT)
		if ti, err := unix.GetsockoptTCPInfo(fd, unix.IPPROTO_TCP, unix.TCP_INFO); err == nil {
			st.TCPInfo = &TCPInfo{
				State:          tcpStateName(ti.State),
				RTTMicros:      ti.Rtt,
				RTTVarMicros:   ti.Rttvar,
				Retransmits:    ti.Retransmits,
				TotalRetrans:   ti.Total_retrans,
				Probes:         ti.Probes,
				Unacked:        ti.Unacked,
				LastDataRecvMs: ti.Last_data_recv,
				LastDataSentMs: ti.Last_data_sent,
				notsentBytes:   ti.Notsent_bytes,
			}
		} else if firstErr == nil {
			firstErr = err
		}
	})
	if cerr != nil {
		return st, cerr
	}
	return st, firstErr
}

// tcpStateName names a TCP_INFO state as ss(8) does.
func tcpStateName(s uint8) string {
	names := [...]string{"", "ESTAB", "SYN-SENT", "SYN-RECV", "FIN-WAIT-1", "FIN-WAIT-2",
		"TIME-WAIT", "UNCONN", "CLOSE-WAIT", "LAST-ACK", "LISTEN", "CLOSING"}
	if int(s) < len(names) && names[s] != "" {
		return names[s]
	}
	return "UNKNOWN"
}

// socketClosedByKernel reports whether the kernel has closed tc's
// connection (TCP state CLOSE) while its descriptor is still open: after an
// RST, an abort (ETIMEDOUT), or both FINs exchanged and acknowledged.
func socketClosedByKernel(tc *net.TCPConn) bool {
	rc, err := tc.SyscallConn()
	if err != nil {
		return false
	}
	closed := false
	_ = rc.Control(func(fd uintptr) {
		ti, err := unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO)
		closed = err == nil && ti.State == tcpClose
	})
	return closed
}

// tcpClose is TCP_CLOSE, the state of include/net/tcp_states.h that
// TCP_INFO reports for a closed connection.
const tcpClose = 7

// icmpSoftErrors are the errors an ICMP destination unreachable leaves on
// an established socket, which the kernel reports in place of ETIMEDOUT
// when it aborts (isICMPSoftError).
var icmpSoftErrors = []syscall.Errno{
	syscall.EHOSTUNREACH, syscall.ENETUNREACH, syscall.ECONNREFUSED,
	syscall.ENOPROTOOPT, syscall.EHOSTDOWN, syscall.ENONET,
}

// sendQueue reads what tc's send queue holds (section 7 of the project's
// reference): the bytes written and not yet acknowledged by the peer, sent
// or not (SIOCOUTQ: write_seq - snd_una, our FIN counted once sent), the
// bytes the peer has acknowledged since the connection opened (TCP_INFO's
// tcpi_bytes_acked, Linux 4.1 and later), and whether the kernel has closed
// the connection (an RST, or both FINs exchanged and acknowledged). TCP_INFO
// is read before the queue, so acked + outq never counts past what was
// written by then: it is short by what was acknowledged between the two
// calls, microseconds' worth. ok is false when they cannot be read.
func sendQueue(tc *net.TCPConn) (q sendQueueState, ok bool) {
	if tc == nil {
		return q, false
	}
	rc, err := tc.SyscallConn()
	if err != nil {
		return q, false
	}
	cerr := rc.Control(func(fdp uintptr) {
		fd := int(fdp)
		ti, err := unix.GetsockoptTCPInfo(fd, unix.IPPROTO_TCP, unix.TCP_INFO)
		if err != nil {
			return
		}
		n, err := unix.IoctlGetInt(fd, unix.SIOCOUTQ)
		if err != nil {
			return
		}
		q, ok = sendQueueState{outq: n, acked: ti.Bytes_acked, closed: ti.State == tcpClose}, true
	})
	return q, ok && cerr == nil
}
