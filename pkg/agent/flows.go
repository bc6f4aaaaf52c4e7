package agent

import (
	"context"
	"encoding/json"
	"errors"
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/meshcrypt/meshcrypt/pkg/api/v1alpha1"
	"github.com/meshcrypt/meshcrypt/pkg/datapath"
	"github.com/meshcrypt/meshcrypt/pkg/flow"
	"github.com/meshcrypt/meshcrypt/pkg/identity"
)

// This file serves the classifier's flow events (docs/monitor.md): one goroutine reads the
// ring buffer and fans the events out, as flow.Records, to the clients of GET /flows on the
// metrics server. Flow events are on in the kernel only while at least one client is
// connected, so nobody watching costs the classifier one array lookup per packet.

// FlowOptions configure the agent's flow events.
type FlowOptions struct {
	// Rate is how many flow events each CPU may emit per second, for drops and for sampled
	// allowed packets each, while a client watches. 0 turns flow events off: /flows answers
	// 503 and the MeshNode advertises no monitor address.
	Rate uint32
	// Sample makes 1 in Sample allowed packets per CPU, and every TCP SYN, an event; 0
	// reports drops only.
	Sample uint32
	// ListenAddr is the metrics server's listen address, which serves /flows. The agent
	// advertises its port, with its host when that is a specific address and else the node's
	// first underlay address, in MeshNode status.monitorAddress. "" advertises nothing.
	ListenAddr string
}

// Defaults of the agent's flags.
const (
	// DefaultFlowRate is the default FlowOptions.Rate.
	DefaultFlowRate = 1000
	// DefaultFlowSample is the default FlowOptions.Sample.
	DefaultFlowSample = 100
)

// flowQueue is how many records a client may lag behind before it loses some.
const flowQueue = 1024

// flowStatsPeriod is how often the kernel's lost and rate-limited counters are read.
const flowStatsPeriod = 2 * time.Second

var errFlowsUnavailable = errors.New("flow events are not available yet: the classifier is not loaded")

// flowSwitch turns the classifier's flow events on and off (*datapath.Classifier).
type flowSwitch interface {
	SetFlowEvents(datapath.FlowConfig) error
}

var _ flowSwitch = (*datapath.Classifier)(nil)

// flowHub hands the flow events to the connected clients. Its zero value is ready; runFlows
// makes it live.
type flowHub struct {
	mu   sync.Mutex
	sw   flowSwitch // nil while no reader runs
	cfg  datapath.FlowConfig
	subs map[*flowSub]struct{}
}

// flowSub is one connected client.
type flowSub struct {
	filter  flow.Filter
	ch      chan flow.Record
	dropped atomic.Uint64 // records that found ch full
}

// start makes the hub serve clients, turning events on with cfg while any is connected; a nil
// sw stops it (connected clients stay until they go).
func (h *flowHub) start(sw flowSwitch, cfg datapath.FlowConfig) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if sw == nil && h.sw != nil && len(h.subs) > 0 {
		_ = h.sw.SetFlowEvents(datapath.FlowConfig{}) // best effort: the next agent resets too
	}
	h.sw, h.cfg = sw, cfg
}

// subscribe adds a client, turning flow events on for the first one.
func (h *flowHub) subscribe(f flow.Filter) (*flowSub, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.sw == nil {
		return nil, errFlowsUnavailable
	}
	if len(h.subs) == 0 {
		if err := h.sw.SetFlowEvents(h.cfg); err != nil {
			return nil, err
		}
	}
	if h.subs == nil {
		h.subs = map[*flowSub]struct{}{}
	}
	s := &flowSub{filter: f, ch: make(chan flow.Record, flowQueue)}
	h.subs[s] = struct{}{}
	return s, nil
}

// unsubscribe removes a client, turning flow events off after the last one.
func (h *flowHub) unsubscribe(s *flowSub) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	delete(h.subs, s)
	if len(h.subs) == 0 && h.sw != nil {
		return h.sw.SetFlowEvents(datapath.FlowConfig{})
	}
	return nil
}

// watching reports whether any client is connected.
func (h *flowHub) watching() bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	return len(h.subs) > 0
}

// publish queues r for every client whose filter selects it, never blocking: a client whose
// queue is full loses r (and is told so).
func (h *flowHub) publish(r flow.Record) {
	h.mu.Lock()
	defer h.mu.Unlock()
	for s := range h.subs {
		if !s.filter.Match(&r) {
			continue
		}
		select {
		case s.ch <- r:
		default:
			s.dropped.Add(1)
		}
	}
}

// runFlows reads the classifier's flow events and publishes them until ctx ends. Flow events
// stay off until a client connects (a previous agent may have left them on).
func (a *Agent) runFlows(ctx context.Context, clf *datapath.Classifier) {
	if err := clf.SetFlowEvents(datapath.FlowConfig{}); err != nil {
		a.log.Warn("turn flow events off", "err", err)
	}
	if a.opts.Flows.Rate == 0 {
		return
	}
	rd, err := clf.NewFlowReader()
	if err != nil {
		a.log.Error("flow events unavailable", "err", err)
		return
	}
	defer rd.Close()
	h := &a.flows
	h.start(clf, datapath.FlowConfig{Rate: a.opts.Flows.Rate, Sample: a.opts.Flows.Sample})
	defer h.start(nil, datapath.FlowConfig{})
	go a.watchFlowLoss(ctx, clf)
	for {
		f, err := rd.Read(ctx)
		if err != nil {
			if ctx.Err() == nil {
				a.log.Error("read flow events", "err", err)
			}
			return
		}
		if h.watching() {
			h.publish(a.flowRecord(f))
		}
	}
}

// watchFlowLoss tells the clients how many events the kernel lost (ring full) or suppressed
// (rate limit) since it last looked.
func (a *Agent) watchFlowLoss(ctx context.Context, clf *datapath.Classifier) {
	tick := time.NewTicker(flowStatsPeriod)
	defer tick.Stop()
	last, _ := clf.FlowStats()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		st, err := clf.FlowStats()
		if err != nil {
			continue
		}
		now := time.Now()
		for _, l := range []flow.Lost{
			{Events: st.Lost - last.Lost, Cause: flow.LostRingFull},
			{Events: st.RateLimited - last.RateLimited, Cause: flow.LostRateLimited},
		} {
			if l.Events > 0 {
				a.flows.publish(flow.Record{Time: now, Node: a.opts.NodeName, Lost: &l})
			}
		}
		last = st
	}
}

// flowRecord turns a classifier event into the wire format, with the identities' labels as
// this agent knows them.
func (a *Agent) flowRecord(f datapath.Flow) flow.Record {
	verdict := flow.Allow
	if f.Dropped() {
		verdict = flow.Drop
	}
	fl := &flow.Flow{
		Direction:   f.Direction.String(),
		Verdict:     verdict,
		Reason:      f.Reason.String(),
		Encrypted:   f.Encrypted,
		Remote:      f.Remote,
		Sampled:     f.Sampled,
		Connection:  flow.ConnectionNew,
		Protocol:    flow.ProtocolName(f.Proto),
		TCPFlags:    flow.TCPFlagNames(f.TCPFlags),
		Length:      f.Length,
		Source:      a.flowEndpoint(f.SrcIdentity, f.Src),
		Destination: a.flowEndpoint(f.DstIdentity, f.Dst),
	}
	switch {
	case f.Reply:
		fl.Connection = flow.ConnectionReply
	case f.Tracked:
		fl.Connection = flow.ConnectionEstablished
	}
	return flow.Record{Time: f.Time, Node: a.opts.NodeName, Flow: fl}
}

func (a *Agent) flowEndpoint(id uint32, ap netip.AddrPort) flow.Endpoint {
	e := flow.Endpoint{Identity: id, IP: ap.Addr(), Port: ap.Port()}
	if id != 0 && a.alloc != nil {
		if l, ok := a.alloc.Labels(identity.Identity(id)); ok {
			e.Labels = l.Map()
		}
	}
	return e
}

// FlowsHandler serves GET /flows: the classifier's flow events as JSON lines of flow.Record,
// selected by the query (flow.ParseQuery: identity=, verdict=), until the client goes away.
// Events flow only while some client is connected. It answers 400 for a bad query and 503
// before the classifier is loaded or with flow events disabled. Safe for concurrent use.
func (a *Agent) FlowsHandler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		filter, err := flow.ParseQuery(r.URL.Query())
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		if a.opts.Flows.Rate == 0 {
			http.Error(w, "flow events are disabled on this agent (--flow-rate 0)", http.StatusServiceUnavailable)
			return
		}
		sub, err := a.flows.subscribe(filter)
		if err != nil {
			http.Error(w, err.Error(), http.StatusServiceUnavailable)
			return
		}
		defer func() {
			if err := a.flows.unsubscribe(sub); err != nil {
				a.log.Warn("turn flow events off", "err", err)
			}
		}()
		a.log.Info("flow client connected", "client", r.RemoteAddr, "query", r.URL.RawQuery)
		defer a.log.Info("flow client gone", "client", r.RemoteAddr)

		rc := http.NewResponseController(w)
		// A stream outlives the metrics server's write timeout.
		_ = rc.SetWriteDeadline(time.Time{})
		w.Header().Set("Content-Type", flow.ContentType)
		w.Header().Set("Cache-Control", "no-store")
		w.Header().Set("X-Content-Type-Options", "nosniff")
		w.WriteHeader(http.StatusOK)
		if err := rc.Flush(); err != nil {
			return
		}
		enc := json.NewEncoder(w)
		write := func(rec flow.Record) error {
			if n := sub.dropped.Swap(0); n > 0 {
				lost := flow.Record{Time: time.Now(), Node: a.opts.NodeName, Lost: &flow.Lost{Events: n, Cause: flow.LostSlowClient}}
				if err := enc.Encode(lost); err != nil {
					return err
				}
			}
			return enc.Encode(rec)
		}
		for {
			select {
			case <-r.Context().Done():
				return
			case rec := <-sub.ch:
				if write(rec) != nil {
					return
				}
				// Write what else is queued, then flush once.
				for more := true; more; {
					select {
					case rec := <-sub.ch:
						if write(rec) != nil {
							return
						}
					default:
						more = false
					}
				}
				if rc.Flush() != nil {
					return
				}
			}
		}
	})
}

// monitorAddress is where clients reach this agent's /flows, for MeshNode status: the
// metrics listen address's host when it names one, else the node's first underlay address,
// with the listen port. "" when flow events are off or nothing is known.
func (a *Agent) monitorAddress(underlay []v1alpha1.IP) string {
	if a.opts.Flows.Rate == 0 || a.opts.Flows.ListenAddr == "" {
		return ""
	}
	host, port, err := net.SplitHostPort(a.opts.Flows.ListenAddr)
	if err != nil {
		return ""
	}
	p, err := strconv.ParseUint(port, 10, 16)
	if err != nil || p == 0 {
		return ""
	}
	if ip, err := netip.ParseAddr(host); err == nil && !ip.IsUnspecified() {
		return netip.AddrPortFrom(ip, uint16(p)).String()
	} else if err != nil && host != "" {
		return net.JoinHostPort(host, port) // a name
	}
	for _, u := range underlay {
		if ip, err := netip.ParseAddr(string(u)); err == nil {
			return netip.AddrPortFrom(ip, uint16(p)).String()
		}
	}
	return ""
}

// Handlers are the agent's routes for the metrics server beyond metrics and health:
// "GET /flows" (FlowsHandler).
func (a *Agent) Handlers() map[string]http.Handler {
	return map[string]http.Handler{"GET " + flow.Path: a.FlowsHandler()}
}
