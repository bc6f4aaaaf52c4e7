package ipsec

import (
	"cmp"
	"context"
	"fmt"
	"math"
	"net/netip"
	"slices"
	"time"

	"github.com/vishvananda/netlink"
)

// SeqLimit is the last ESP sequence number of a state: the states use
// 32-bit sequence numbers (no ESN), and the kernel stops sending on an
// outbound state once its sequence number reaches it (counted in
// XfrmOutStateSeqError). Fresh keys reset it: a rotation ([Plan] with a new
// keyring SPI) or a new boot ID. At 1 Mpps between one pair of nodes in
// one direction the space lasts about 71 minutes; at 100 kpps about 12
// hours. Watch [SAStatus.SeqUsed] and rotate before it nears 1.
const SeqLimit = math.MaxUint32

// SAStatus is the state of one owned ESP state, read from the kernel.
//
// What the kernel reports (netlink XFRMA_REPLAY_VAL and the usersa_info
// counters, as vishvananda/netlink decodes them): the last sequence number
// sent (outbound) or the highest received (inbound), packets and bytes,
// replayed packets, packets outside the replay window, integrity (ICV)
// failures, and when the state was added and first used. It does not
// report which side a state is on; Node and Dir come from the last Apply.
type SAStatus struct {
	// Node and Dir are those of the last applied Desired ("" and 0 for a
	// state Apply has not installed in this process: adopted after a
	// restart, or stale).
	Node string
	Dir  Dir
	// Src, Dst and SPI identify the state; KeyringSPI, SrcID and IPv6
	// (the inner family) are decoded from the SPI ([SplitSPI]).
	Src, Dst   netip.Addr
	SPI        uint32
	KeyringSPI uint8
	SrcID      uint16
	IPv6       bool
	// Algorithm is the kernel's AEAD or cipher name.
	Algorithm string
	// OutSeq is the last sequence number sent; InSeq the highest received.
	OutSeq, InSeq uint32
	// Packets and Bytes processed.
	Packets, Bytes uint64
	// ReplayDrops counts replayed packets, WindowDrops packets older than
	// the replay window, IntegrityFailures packets whose ICV failed.
	ReplayDrops, WindowDrops, IntegrityFailures uint32
	// Added is when the state was installed; LastUsed when it first
	// processed a packet (zero: never).
	Added, LastUsed time.Time
}

// SeqUsed returns how much of the sequence space the state has used, from
// 0 to 1: OutSeq/SeqLimit, or InSeq/SeqLimit for an inbound state.
func (s SAStatus) SeqUsed() float64 {
	seq := s.OutSeq
	if s.Dir == DirIn || s.InSeq > seq {
		seq = s.InSeq
	}
	return float64(seq) / float64(SeqLimit)
}

// Status returns the owned ESP states with their counters, ordered by
// destination and SPI. It changes nothing.
func (x *XFRM) Status(ctx context.Context) ([]SAStatus, error) {
	states, err := dump(ctx, "XFRM states", func() ([]netlink.XfrmState, error) { return x.nl.XfrmStateList(netlink.FAMILY_ALL) })
	if err != nil {
		return nil, fmt.Errorf("XFRM status: %w", err)
	}
	x.mu.Lock()
	defer x.mu.Unlock()
	var out []SAStatus
	for i := range states {
		c := &states[i]
		if uint32(c.Reqid) != x.reqID || c.Proto != netlink.XFRM_PROTO_ESP {
			continue
		}
		src, _ := netip.AddrFromSlice(c.Src)
		dst, _ := netip.AddrFromSlice(c.Dst)
		s := SAStatus{
			Src: src.Unmap(), Dst: dst.Unmap(), SPI: uint32(c.Spi),
			Packets: c.Statistics.Packets, Bytes: c.Statistics.Bytes,
			ReplayDrops: c.Statistics.Replay, WindowDrops: c.Statistics.ReplayWindow, IntegrityFailures: c.Statistics.Failed,
		}
		s.KeyringSPI, s.SrcID, _, s.IPv6 = SplitSPI(s.SPI)
		if c.Statistics.AddTime != 0 {
			s.Added = time.Unix(int64(c.Statistics.AddTime), 0)
		}
		if c.Statistics.UseTime != 0 {
			s.LastUsed = time.Unix(int64(c.Statistics.UseTime), 0)
		}
		switch {
		case c.Aead != nil:
			s.Algorithm = c.Aead.Name
		case c.Crypt != nil && c.Auth != nil:
			s.Algorithm = c.Crypt.Name + "+" + c.Auth.Name
		}
		if c.Replay != nil {
			s.OutSeq, s.InSeq = c.Replay.OSeq, c.Replay.Seq
		}
		if d, ok := x.dirs[stateID{netlinkForm(s.Dst), s.SPI}]; ok {
			s.Node, s.Dir = d.Node, d.Dir
			s.Src, s.Dst = d.Src.Unmap(), d.Dst.Unmap()
		}
		out = append(out, s)
	}
	slices.SortFunc(out, func(a, b SAStatus) int {
		if c := a.Dst.Compare(b.Dst); c != 0 {
			return c
		}
		return cmp.Compare(a.SPI, b.SPI)
	})
	return out, nil
}

// OutboundTunnels returns the tunnel destinations (remote underlay
// addresses) that owned out policies encrypt to now. The agent reads it
// before an Apply: a node whose out policy is already in the kernel stays
// reachable through the change (Apply updates policies in place), one
// without is not yet. It changes nothing.
func (x *XFRM) OutboundTunnels(ctx context.Context) (map[netip.Addr]bool, error) {
	pols, err := dump(ctx, "XFRM policies", func() ([]netlink.XfrmPolicy, error) { return x.nl.XfrmPolicyList(netlink.FAMILY_ALL) })
	if err != nil {
		return nil, fmt.Errorf("XFRM outbound tunnels: %w", err)
	}
	out := map[netip.Addr]bool{}
	for i := range pols {
		p := &pols[i]
		if p.Dir != netlink.XFRM_DIR_OUT || !x.ownsPolicy(p) {
			continue
		}
		for _, t := range p.Tmpls {
			if a, ok := netip.AddrFromSlice(t.Dst); ok {
				out[a.Unmap()] = true
			}
		}
	}
	return out, nil
}
