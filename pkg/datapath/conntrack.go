package datapath

import (
	"errors"
	"fmt"
	"net/netip"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// This file is the Go side of the classifier's connection table (docs/datapath.md,
// "Connections"): its counters and a read of what it holds.

// ConnFlags describe a tracked connection (CT_* of bpf/include/datapath.h, less CT_ORIG_A,
// which Connection resolves into Src and Dst).
type ConnFlags uint8

// The connection flags.
const (
	// ConnFromPod: judged by from_pod (the originator is a local pod: its egress and the
	// responder's ingress); else by to_pod (the responder's ingress).
	ConnFromPod ConnFlags = 1 << 1
	// ConnRequired: the connection must be encrypted cross-node, in both directions.
	ConnRequired ConnFlags = 1 << 2
	// ConnReplied: the responder has answered.
	ConnReplied ConnFlags = 1 << 3
	// ConnFinOrig and ConnFinReply: TCP FIN seen from the originator, from the responder.
	ConnFinOrig  ConnFlags = 1 << 4
	ConnFinReply ConnFlags = 1 << 5
	// ConnRST: TCP RST seen.
	ConnRST ConnFlags = 1 << 6
)

const connOrigA = 1 << 0

func (f ConnFlags) String() string {
	return flagString(uint32(f), []string{"", "from-pod", "required", "replied", "fin-orig", "fin-reply", "rst"})
}

// Connection is one entry of the connection table.
type Connection struct {
	// Src is the originator's address and port, Dst the responder's (IPv4 unmapped). For ICMP
	// echo the originator's port is the echo identifier and the responder's 0.
	Src, Dst netip.AddrPort
	// Proto is the IP protocol.
	Proto uint8
	// SrcIdentity and DstIdentity are the identities of the last judgement.
	SrcIdentity, DstIdentity uint32
	// Reason is the last judgement's: ReasonAllowed or ReasonAllowedNoPolicy.
	Reason Reason
	// Flags are the connection's state.
	Flags ConnFlags
	// Epoch is the policy epoch of the last judgement (Classifier.Epoch).
	Epoch uint32
	// Idle is how long ago the connection last refreshed its entry (at most a second late).
	Idle time.Duration
}

// ConntrackStats count the connection table's work, summed over CPUs.
type ConntrackStats struct {
	// Created connections were entered.
	Created uint64
	// CreateFailed first packets were allowed but could not be entered: their replies are
	// judged on their own.
	CreateFailed uint64
	// Rejudged packets belonged to a connection judged at an older epoch and were judged
	// again.
	Rejudged uint64
}

// Indexes of the ct_stats map.
const (
	ctStatCreated      uint32 = 0
	ctStatCreateFailed uint32 = 1
	ctStatRejudged     uint32 = 2
)

// ConntrackStats returns the connection table's counters.
func (c *Classifier) ConntrackStats() (ConntrackStats, error) {
	var st ConntrackStats
	for _, s := range []struct {
		idx uint32
		to  *uint64
	}{{ctStatCreated, &st.Created}, {ctStatCreateFailed, &st.CreateFailed}, {ctStatRejudged, &st.Rejudged}} {
		var perCPU []uint64
		if err := c.objs.CtStats.Lookup(s.idx, &perCPU); err != nil {
			return st, fmt.Errorf("read connection table counter %d: %w", s.idx, err)
		}
		for _, v := range perCPU {
			*s.to += v
		}
	}
	return st, nil
}

// ConntrackCapacity is the number of connections the table holds.
func (c *Classifier) ConntrackCapacity() int { return int(c.objs.Conntrack.MaxEntries()) }

// Connections returns what the connection table holds, timed-out entries included (they
// stay until the LRU reuses them). A table that changes while it is read may be read in part
// twice or not at all, as any BPF hash map iteration; the read is retried a few times.
func (c *Classifier) Connections() ([]Connection, error) {
	now, err := bootTime()
	if err != nil {
		return nil, err
	}
	var out []Connection
	for range 3 {
		out = out[:0]
		var k classifierCtKey
		var v classifierCtEntry
		it := c.objs.Conntrack.Iterate()
		for it.Next(&k, &v) {
			out = append(out, decodeConnection(k, v, now))
		}
		err = it.Err()
		if !errors.Is(err, ebpf.ErrIterationAborted) {
			break
		}
	}
	if err != nil {
		return nil, fmt.Errorf("read connection table: %w", err)
	}
	return out, nil
}

func decodeConnection(k classifierCtKey, v classifierCtEntry, now time.Duration) Connection {
	a := netip.AddrPortFrom(netip.AddrFrom16(k.AddrA).Unmap(), k.PortA)
	b := netip.AddrPortFrom(netip.AddrFrom16(k.AddrB).Unmap(), k.PortB)
	if v.Flags&connOrigA == 0 {
		a, b = b, a
	}
	return Connection{
		Src: a, Dst: b, Proto: k.Proto,
		SrcIdentity: v.SrcIdentity, DstIdentity: v.DstIdentity,
		Reason: Reason(v.Reason),
		Flags:  ConnFlags(v.Flags &^ connOrigA),
		Epoch:  v.Epoch,
		Idle:   now - time.Duration(v.Seen),
	}
}

// bootTime reads CLOCK_BOOTTIME, the clock of the connection table and of flow events.
func bootTime() (time.Duration, error) {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_BOOTTIME, &ts); err != nil {
		return 0, fmt.Errorf("read CLOCK_BOOTTIME: %w", err)
	}
	return time.Duration(ts.Nano()), nil
}
