package datapath

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"structs"
	"sync"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/ringbuf"
	"golang.org/x/sys/unix"
)

// This file is the Go side of the classifier's flow events (docs/datapath.md, "Flow events"):
// the knobs in the config map, the per-CPU counters, and a reader of the ring buffer.

// FlowDirection says which program saw a flow event.
type FlowDirection uint8

// The directions of flow events.
const (
	// FromPod: from_pod saw the packet leaving a local pod.
	FromPod FlowDirection = 0
	// ToPod: to_pod saw the packet being delivered to a local pod.
	ToPod FlowDirection = 1
)

// String returns "from_pod" or "to_pod", the programs' names.
func (d FlowDirection) String() string {
	switch d {
	case FromPod:
		return "from_pod"
	case ToPod:
		return "to_pod"
	}
	return fmt.Sprintf("FlowDirection(%d)", uint8(d))
}

// Flow is one flow event: a packet the classifier passed or dropped, as it saw it.
type Flow struct {
	// Time is when the classifier saw the packet.
	Time time.Time
	// Direction is the program that saw it.
	Direction FlowDirection
	// Reason is the verdict's reason; Reason.Dropped() says whether it was dropped.
	Reason Reason
	// SrcIdentity and DstIdentity are the identities the ipcache gave the addresses (world
	// for a miss); 0 when the packet was too malformed to look them up.
	SrcIdentity, DstIdentity uint32
	// Src and Dst are the addresses (IPv4 unmapped) and ports (0 for port-less protocols and
	// non-first fragments). An address the classifier did not parse is the zero Addr.
	Src, Dst netip.AddrPort
	// Proto is the IP protocol (IPv6: the one after the extension headers).
	Proto uint8
	// TCPFlags is the TCP header's flags byte (FIN 0x01, SYN 0x02, RST 0x04, ACK 0x10); 0 for
	// other protocols.
	TCPFlags uint8
	// Remote: the peer (the destination for FromPod, the source for ToPod) is a pod on
	// another node.
	Remote bool
	// Encrypted: the packet passed and the peer's tunnel is ready, so it goes into (FromPod)
	// or came out of (ToPod) the encrypted tunnel.
	Encrypted bool
	// Sampled: an allowed packet the 1-in-N sampler picked; false for drops and TCP SYNs,
	// which are always candidates.
	Sampled bool
	// Tracked: the connection table passed (or, when policy no longer allows the connection,
	// denied) the packet as part of a known connection instead of judging it as a first packet.
	Tracked bool
	// Reply: Tracked, and the packet goes from the connection's responder to its originator,
	// or is an ICMP error about the connection.
	Reply bool
	// Length is the packet's length, Ethernet header included.
	Length uint32
	// Ifindex is the interface the classifier ran on: the pod's host-side interface.
	Ifindex int
}

// Dropped reports whether the classifier dropped the packet.
func (f Flow) Dropped() bool { return f.Reason.Dropped() }

// FlowConfig sets which packets become flow events (docs/datapath.md, "Flow events").
type FlowConfig struct {
	// Rate is how many events each CPU may emit per second, for drops and for allowed
	// samples each (a token bucket of that size, refilled once empty). 0 turns flow events
	// off: the classifier then costs one array lookup more than without them.
	Rate uint32
	// Sample makes every Sample-th allowed packet on a CPU, and every TCP SYN, a candidate;
	// 0 reports drops only. 1 makes every allowed packet a candidate.
	Sample uint32
}

// FlowStats count what became of flow event candidates, summed over CPUs.
type FlowStats struct {
	// Submitted events were written to the ring.
	Submitted uint64
	// Lost events found the ring full: the reader fell behind. The packets were not affected.
	Lost uint64
	// RateLimited candidates were suppressed by the rate limit.
	RateLimited uint64
}

// Indexes of the config map and of the flow_stats map (bpf/include/datapath.h).
const (
	configFlags      uint32 = 0
	configFlowRate   uint32 = 1
	configFlowSample uint32 = 2
	configEpoch      uint32 = 3

	flowStatSubmitted   uint32 = 0
	flowStatLost        uint32 = 1
	flowStatRateLimited uint32 = 2
)

// The flags of struct flow_event.
const (
	flowToPod     = 1 << 0
	flowRemote    = 1 << 1
	flowEncrypted = 1 << 2
	flowSampled   = 1 << 3
	flowTracked   = 1 << 4
	flowReply     = 1 << 5
)

// SetFlowEvents configures flow events. Turning them on (from Rate 0) resets every CPU's
// sampler and rate limiter, so the first candidate on each CPU is written. Idempotent, safe for
// concurrent use.
func (c *Classifier) SetFlowEvents(cfg FlowConfig) error {
	c.configMu.Lock()
	defer c.configMu.Unlock()
	var rate uint32
	if err := c.objs.Config.Lookup(configFlowRate, &rate); err != nil {
		return fmt.Errorf("read flow event config: %w", err)
	}
	if rate == 0 && cfg.Rate != 0 {
		n, err := ebpf.PossibleCPU()
		if err != nil {
			return fmt.Errorf("reset flow event state: %w", err)
		}
		if err := c.objs.FlowState.Update(uint32(0), make([]classifierFlowCpu, n), ebpf.UpdateAny); err != nil {
			return fmt.Errorf("reset flow event state: %w", err)
		}
	}
	// The sample rate first: a sampler turned on finds its rate in place.
	if err := c.objs.Config.Update(configFlowSample, cfg.Sample, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("set flow sample rate: %w", err)
	}
	if err := c.objs.Config.Update(configFlowRate, cfg.Rate, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("set flow event rate: %w", err)
	}
	return nil
}

// FlowStats returns the flow event counters, summed over CPUs.
func (c *Classifier) FlowStats() (FlowStats, error) {
	var st FlowStats
	for idx, dst := range map[uint32]*uint64{
		flowStatSubmitted: &st.Submitted, flowStatLost: &st.Lost, flowStatRateLimited: &st.RateLimited,
	} {
		var perCPU []uint64
		if err := c.objs.FlowStats.Lookup(idx, &perCPU); err != nil {
			return FlowStats{}, fmt.Errorf("read flow stats: %w", err)
		}
		for _, v := range perCPU {
			*dst += v
		}
	}
	return st, nil
}

// flowEvent mirrors struct flow_event of bpf/include/datapath.h (bpf2go emits only types the
// object's BTF holds, and this one lives in the ring buffer, not in a map).
type flowEvent struct {
	_           structs.HostLayout
	Time        uint64
	SrcIdentity uint32
	DstIdentity uint32
	SrcAddr     [16]uint8
	DstAddr     [16]uint8
	Sport       uint16
	Dport       uint16
	Len         uint32
	Ifindex     uint32
	Proto       uint8
	Reason      uint8
	Flags       uint8
	TCPFlags    uint8
}

// flowEventSize is sizeof(struct flow_event); flowRingSize is FLOW_RING_SIZE, the ring's size
// in bytes (each event takes flowEventSize plus an 8-byte header).
const (
	flowEventSize = 64
	flowRingSize  = 1 << 18
)

// ErrFlowReaderClosed is returned by FlowReader.Read after Close.
var ErrFlowReaderClosed = errors.New("flow reader closed")

// FlowReader reads the classifier's flow events. The ring buffer is pinned with the other
// maps, so a restarted agent's reader finds the events its predecessor left. The ring has one
// consumer: use one FlowReader per node.
type FlowReader struct {
	rd *ringbuf.Reader

	mu  sync.Mutex // serialises Read
	rec ringbuf.Record
}

// NewFlowReader opens a reader of the classifier's flow event ring. It does not turn flow
// events on (SetFlowEvents does).
func (c *Classifier) NewFlowReader() (*FlowReader, error) {
	rd, err := ringbuf.NewReader(c.objs.FlowEvents)
	if err != nil {
		return nil, fmt.Errorf("open flow event ring: %w", err)
	}
	return &FlowReader{rd: rd}, nil
}

// Read returns the next flow event, waiting for one until ctx ends (then it returns ctx's
// error) or the reader is closed (ErrFlowReaderClosed). Events are returned in the order the
// ring holds them. Safe for concurrent use, though one caller is the norm.
func (r *FlowReader) Read(ctx context.Context) (Flow, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	// Flush wakes a waiting read, which then returns what the ring holds and ErrFlushed.
	stop := context.AfterFunc(ctx, func() { _ = r.rd.Flush() })
	defer stop()
	for {
		if err := ctx.Err(); err != nil {
			return Flow{}, err
		}
		err := r.rd.ReadInto(&r.rec)
		switch {
		case err == nil:
		case errors.Is(err, ringbuf.ErrFlushed):
			continue // ctx ended (checked above), or a stale flush: read on
		case errors.Is(err, os.ErrClosed), errors.Is(err, ringbuf.ErrClosed):
			return Flow{}, ErrFlowReaderClosed
		default:
			return Flow{}, fmt.Errorf("read flow event: %w", err)
		}
		f, err := decodeFlow(r.rec.RawSample, bootToWall())
		if err != nil {
			return Flow{}, err
		}
		return f, nil
	}
}

// Close stops the reader; a Read waiting for an event returns ErrFlowReaderClosed.
// Idempotent.
func (r *FlowReader) Close() error {
	if err := r.rd.Close(); err != nil && !errors.Is(err, os.ErrClosed) {
		return fmt.Errorf("close flow event ring: %w", err)
	}
	return nil
}

// bootToWall returns a function that converts CLOCK_BOOTTIME nanoseconds (the events' clock)
// to wall-clock time, anchored now.
func bootToWall() func(uint64) time.Time {
	now := time.Now()
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_BOOTTIME, &ts); err != nil {
		return func(uint64) time.Time { return now }
	}
	boot := uint64(ts.Nano())
	return func(t uint64) time.Time {
		if t > boot {
			return now
		}
		return now.Add(-time.Duration(boot - t))
	}
}

// decodeFlow decodes one struct flow_event.
func decodeFlow(b []byte, wall func(uint64) time.Time) (Flow, error) {
	if len(b) < flowEventSize {
		return Flow{}, fmt.Errorf("flow event of %d bytes, want %d", len(b), flowEventSize)
	}
	var e flowEvent
	if _, err := binary.Decode(b[:flowEventSize], binary.NativeEndian, &e); err != nil {
		return Flow{}, fmt.Errorf("decode flow event: %w", err)
	}
	f := Flow{
		Time:        wall(e.Time),
		Direction:   FromPod,
		Reason:      Reason(e.Reason),
		SrcIdentity: e.SrcIdentity,
		DstIdentity: e.DstIdentity,
		Src:         netip.AddrPortFrom(eventAddr(e.SrcAddr), e.Sport),
		Dst:         netip.AddrPortFrom(eventAddr(e.DstAddr), e.Dport),
		Proto:       e.Proto,
		TCPFlags:    e.TCPFlags,
		Remote:      e.Flags&flowRemote != 0,
		Encrypted:   e.Flags&flowEncrypted != 0,
		Sampled:     e.Flags&flowSampled != 0,
		Tracked:     e.Flags&flowTracked != 0,
		Reply:       e.Flags&flowReply != 0,
		Length:      e.Len,
		Ifindex:     int(e.Ifindex),
	}
	if e.Flags&flowToPod != 0 {
		f.Direction = ToPod
	}
	return f, nil
}

// eventAddr decodes an address as ipcache keys hold it: all zero means not parsed.
func eventAddr(b [16]byte) netip.Addr {
	if b == [16]byte{} {
		return netip.Addr{}
	}
	return netip.AddrFrom16(b).Unmap()
}
