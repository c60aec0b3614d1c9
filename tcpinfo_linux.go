//go:build linux

package tcpops

import (
	"net"
	"unsafe"

	"golang.org/x/sys/unix"
)

// readTCPSample reads tc's TCP_INFO into a tcpSample, with one getsockopt
// and no allocation (unix.GetsockoptTCPInfo returns a heap copy). It
// reports false when the socket cannot be read (closed already, or not a
// TCP socket).
//
// The kernel copies min(optlen, its own struct tcp_info) bytes and writes
// back how many (tcp_get_info, do_tcp_getsockopt): a field past that
// length is one this kernel does not have, and is marked absent rather
// than read as the zero the buffer holds. The fields came with the kernel
// versions of include/uapi/linux/tcp.h: rtt, rttvar, unacked, lost and
// total_retrans are in every TCP_INFO (2.6); bytes_acked and
// bytes_received came in 4.1, segs_out and segs_in in 4.2, notsent_bytes
// and data_segs_in/out in 4.6.
func readTCPSample(tc *net.TCPConn) (s tcpSample, ok bool) {
	rc, err := tc.SyscallConn()
	if err != nil {
		return s, false
	}
	var ti unix.TCPInfo
	n := uint32(unsafe.Sizeof(ti))
	var errno unix.Errno
	cerr := rc.Control(func(fd uintptr) {
		_, _, errno = unix.Syscall6(unix.SYS_GETSOCKOPT, fd, unix.IPPROTO_TCP, unix.TCP_INFO,
			uintptr(unsafe.Pointer(&ti)), uintptr(unsafe.Pointer(&n)), 0)
	})
	if cerr != nil || errno != 0 {
		return s, false
	}
	s = tcpSampleOf(&ti, n)
	return s, s.have != 0
}

// tcpSampleOf takes a tcpSample from the first n bytes of ti, the length
// the kernel answered: a field past it is absent.
func tcpSampleOf(ti *unix.TCPInfo, n uint32) (s tcpSample) {
	has := func(off, size uintptr) bool { return uintptr(n) >= off+size }
	if has(unsafe.Offsetof(ti.Total_retrans), 4) {
		s.have |= tcpHasBase
		s.rtt, s.rttVar = ti.Rtt, ti.Rttvar
		s.unacked, s.lost, s.totalRetrans = ti.Unacked, ti.Lost, ti.Total_retrans
	}
	if has(unsafe.Offsetof(ti.Bytes_received), 8) {
		s.have |= tcpHasBytes
		s.bytesAcked, s.bytesReceived = ti.Bytes_acked, ti.Bytes_received
	}
	if has(unsafe.Offsetof(ti.Segs_in), 4) {
		s.have |= tcpHasSegs
		s.segsOut, s.segsIn = ti.Segs_out, ti.Segs_in
	}
	if has(unsafe.Offsetof(ti.Notsent_bytes), 4) {
		s.have |= tcpHasNotsent
		s.notsent = ti.Notsent_bytes
	}
	if has(unsafe.Offsetof(ti.Data_segs_out), 4) {
		s.have |= tcpHasDataSegs
		s.dataSegsIn, s.dataSegsOut = ti.Data_segs_in, ti.Data_segs_out
	}
	return s
}
