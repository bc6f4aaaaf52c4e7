package metrics

import (
	"context"
	"log/slog"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
)

// Namespace is the prefix of every meshcrypt metric name.
const Namespace = "meshcrypt"

// DefaultScrapeTimeout bounds the Source calls of one scrape unless Options say otherwise.
const DefaultScrapeTimeout = 5 * time.Second

// Source is what the metrics read from the agent at scrape time. Its methods are called
// once per scrape, concurrently with the agent's own work, so they must be safe for
// concurrent use; they only read, so they are idempotent. An error drops that part of the
// scrape (and counts in meshcrypt_metrics_source_errors_total); the rest is still served.
type Source interface {
	// Peers returns this node's WireGuard peers as its device reports them (read back
	// through wgctrl, not the agent's intent). Nil, nil when encryption is off.
	Peers(ctx context.Context) ([]Peer, error)
	// Verdicts returns the policy classifier's counters, one entry per reason, summed over
	// CPUs. They only grow while the classifier's maps live (pinned maps outlive agent
	// restarts). Nil, nil before the classifier is loaded.
	Verdicts(ctx context.Context) ([]Verdict, error)
	// KeyAge returns how long ago this node's WireGuard private key was created; ok is false
	// while the agent has no key yet.
	KeyAge() (age time.Duration, ok bool)
}

// ConntrackSource reads the policy classifier's connection table counters (docs/datapath.md,
// "Connections"). Its method must be safe for concurrent use.
type ConntrackSource interface {
	// Conntrack returns the counters, summed over CPUs; ok is false before the classifier is
	// loaded.
	Conntrack(ctx context.Context) (c Conntrack, ok bool, err error)
}

// Conntrack is what the connection table counts.
type Conntrack struct {
	// Created connections were entered; CreateFailed first packets were allowed but could not
	// be entered (their replies are judged on their own); Rejudged packets belonged to a
	// connection judged at an older policy epoch and were judged again.
	Created, CreateFailed, Rejudged uint64
	// Capacity is the number of connections the table holds (an LRU).
	Capacity int
}

// XFRMSource reads the kernel's XFRM (IPsec) error counters, one per /proc/net/xfrm_stat
// field (the agent reads them with pkg/crypto/ipsec.ReadXfrmStat). Its method must be safe for
// concurrent use.
type XFRMSource interface {
	// XFRMStats returns the counters by field name (XfrmInError, XfrmOutStateExpired, ...).
	XFRMStats(ctx context.Context) (map[string]uint64, error)
}

// Peer is one WireGuard peer of this node.
type Peer struct {
	// Name is the peer's node name.
	Name string
	// Fingerprint identifies the public key the peer is configured with, as
	// `meshcrypt status` prints it (wireguard.Fingerprint).
	Fingerprint string
	// LastHandshake is the last completed handshake; zero if none yet.
	LastHandshake time.Time
	// ReceiveBytes and TransmitBytes count the payload bytes received from and sent to the
	// peer since the device configured it.
	ReceiveBytes, TransmitBytes uint64
	// Ready is true when the peer is configured with its current key, endpoint and pod
	// CIDRs (what MeshNode.status.peersReady counts).
	Ready bool
}

// Verdict is the classifier's count for one reason.
type Verdict struct {
	// Reason is the reason in snake case, as datapath.Reason.String() spells it:
	// allowed, denied_egress, drop_not_encrypted, ...
	Reason string
	// Dropped is true when packets counted under Reason are dropped.
	Dropped bool
	// Packets and Bytes are the counts.
	Packets, Bytes uint64
}

// Options configure a Recorder.
type Options struct {
	// Source is read at every scrape; nil exports no peer, verdict or key metrics.
	Source Source
	// XFRM is read at every scrape; nil exports no XFRM metrics (WireGuard-only agents).
	XFRM XFRMSource
	// Conntrack is read at every scrape; nil exports no connection table metrics.
	Conntrack ConntrackSource
	// ScrapeTimeout bounds the Source and XFRM calls of one scrape; default
	// DefaultScrapeTimeout.
	ScrapeTimeout time.Duration
	// Now is the clock for handshake ages; nil means time.Now.
	Now func() time.Time
	// Logger receives Source errors; nil discards them.
	Logger *slog.Logger
}

// Recorder holds the agent's metrics in a private registry. Create it with New; its methods
// are safe for concurrent use.
type Recorder struct {
	registry  *prometheus.Registry
	reconcile *prometheus.HistogramVec
	rotations prometheus.Counter
	mode      *prometheus.GaugeVec
	configure prometheus.Counter
	peerOps   *prometheus.CounterVec
	nodeOps   prometheus.Counter
	routeOps  *prometheus.CounterVec

	mu       sync.Mutex
	lastMode string
}

// Reconcile results, the values of meshcrypt_reconcile_duration_seconds's result label.
const (
	ResultSuccess = "success"
	ResultError   = "error"
)

// reconcileBuckets span 1 ms to about 24 s: a reconcile that changes one peer takes
// milliseconds, a first start with thousands of pods seconds.
var reconcileBuckets = prometheus.ExponentialBuckets(0.001, 2.5, 12)

// New returns a Recorder with every collector registered. It does no I/O.
func New(opts Options) *Recorder {
	if opts.ScrapeTimeout <= 0 {
		opts.ScrapeTimeout = DefaultScrapeTimeout
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	r := &Recorder{
		registry: prometheus.NewRegistry(),
		reconcile: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: Namespace,
			Name:      "reconcile_duration_seconds",
			Help:      "How long one reconcile of the agent took, by result (success or error).",
			Buckets:   reconcileBuckets,
		}, []string{"result"}),
		rotations: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: Namespace,
			Name:      "key_rotations_total",
			Help:      "Key rotations this agent has carried out since it started.",
		}),
		mode: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Namespace: Namespace,
			Name:      "encryption_mode",
			Help:      "1 for the encryption mode the agent has applied (Disabled, WireGuard, ...), 0 for modes it applied before.",
		}, []string{"mode"}),
	}
	r.configure = prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: Namespace,
		Name:      "wireguard_configure_total",
		Help:      "Configuration calls (wgctrl ConfigureDevice) the agent made on its WireGuard device; an apply that changes nothing makes none.",
	})
	r.peerOps = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: Namespace,
		Name:      "wireguard_peer_updates_total",
		Help:      "WireGuard peers written by those configuration calls, by op: add (a new key), update (an existing key reconfigured), remove.",
	}, []string{"op"})
	r.nodeOps = prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: Namespace,
		Name:      "wireguard_node_updates_total",
		Help:      "Remote nodes whose WireGuard peer those configuration calls wrote: a node whose key changed is one (its old key removed and its new key added in the same call).",
	})
	r.routeOps = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: Namespace,
		Name:      "route_operations_total",
		Help:      "Netlink writes of the tunnel routing state, by op: replace and delete (routes, tunnel and blackhole fallback), rule_add and rule_delete (policy rules).",
	}, []string{"op"})
	// Every label value exists from the start, so rate() and the dashboard see zeros, not gaps.
	r.reconcile.WithLabelValues(ResultSuccess)
	r.reconcile.WithLabelValues(ResultError)
	for _, op := range []string{PeerAdd, PeerUpdate, PeerRemove} {
		r.peerOps.WithLabelValues(op)
	}
	for _, op := range []string{RouteReplace, RouteDelete, RuleAdd, RuleDelete} {
		r.routeOps.WithLabelValues(op)
	}
	errs := prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: Namespace,
		Name:      "metrics_source_errors_total",
		Help:      "Scrapes in which reading the agent's state failed, by source (peers, verdicts, xfrm, conntrack); those metrics were left out.",
	}, []string{"source"})
	r.registry.MustRegister(
		r.reconcile, r.rotations, r.mode, errs, r.configure, r.peerOps, r.nodeOps, r.routeOps,
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
	)
	if opts.Source != nil {
		for _, s := range []string{sourcePeers, sourceVerdicts} {
			errs.WithLabelValues(s)
		}
		r.registry.MustRegister(newSourceCollector(opts, errs))
	}
	if opts.XFRM != nil {
		errs.WithLabelValues(sourceXFRM)
		r.registry.MustRegister(newXFRMCollector(opts, errs))
	}
	if opts.Conntrack != nil {
		errs.WithLabelValues(sourceConntrack)
		r.registry.MustRegister(newConntrackCollector(opts, errs))
	}
	return r
}

// Gatherer returns the registry, for Server and for tests.
func (r *Recorder) Gatherer() prometheus.Gatherer { return r.registry }

// ObserveReconcile records one reconcile that took d and ended with err (nil: success).
func (r *Recorder) ObserveReconcile(d time.Duration, err error) {
	result := ResultSuccess
	if err != nil {
		result = ResultError
	}
	r.reconcile.WithLabelValues(result).Observe(d.Seconds())
}

// Values of meshcrypt_wireguard_peer_updates_total's and meshcrypt_route_operations_total's
// op label.
const (
	PeerAdd      = "add"
	PeerUpdate   = "update"
	PeerRemove   = "remove"
	RouteReplace = "replace"
	RouteDelete  = "delete"
	RuleAdd      = "rule_add"
	RuleDelete   = "rule_delete"
)

// WireGuardConfigured counts one configuration call on the WireGuard device that added,
// updated and removed so many peers. Call it only for calls that were made: an apply that
// found nothing to change is not one.
func (r *Recorder) WireGuardConfigured(added, updated, removed int) {
	r.configure.Inc()
	r.peerOps.WithLabelValues(PeerAdd).Add(float64(added))
	r.peerOps.WithLabelValues(PeerUpdate).Add(float64(updated))
	r.peerOps.WithLabelValues(PeerRemove).Add(float64(removed))
}

// WireGuardNodesUpdated counts the remote nodes whose peer one configuration call wrote
// (meshcrypt_wireguard_node_updates_total): the peers it added, updated and removed, a
// node's key change (a remove and an add) counting once.
func (r *Recorder) WireGuardNodesUpdated(nodes int) {
	r.nodeOps.Add(float64(nodes))
}

// RouteOps counts netlink writes of the tunnel routing state: routes replaced (added or
// changed) and deleted, policy rules added and deleted.
func (r *Recorder) RouteOps(replaced, deleted, rulesAdded, rulesDeleted int) {
	r.routeOps.WithLabelValues(RouteReplace).Add(float64(replaced))
	r.routeOps.WithLabelValues(RouteDelete).Add(float64(deleted))
	r.routeOps.WithLabelValues(RuleAdd).Add(float64(rulesAdded))
	r.routeOps.WithLabelValues(RuleDelete).Add(float64(rulesDeleted))
}

// KeyRotated counts one completed key rotation.
func (r *Recorder) KeyRotated() { r.rotations.Inc() }

// SetMode records the encryption mode the agent has applied ("Disabled", "WireGuard", ...):
// its series becomes 1, the previous mode's 0. Idempotent.
func (r *Recorder) SetMode(mode string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.lastMode != "" && r.lastMode != mode {
		r.mode.WithLabelValues(r.lastMode).Set(0)
	}
	r.mode.WithLabelValues(mode).Set(1)
	r.lastMode = mode
}

// Values of meshcrypt_metrics_source_errors_total's source label.
const (
	sourcePeers     = "peers"
	sourceVerdicts  = "verdicts"
	sourceXFRM      = "xfrm"
	sourceConntrack = "conntrack"
)

// Values of meshcrypt_policy_connections_total's event label.
const (
	ConnCreated      = "created"
	ConnCreateFailed = "create_failed"
	ConnRejudged     = "rejudged"
)

// Values of meshcrypt_peers's state label and meshcrypt_policy_verdict_*'s verdict label.
const (
	StateReady    = "ready"
	StateNotReady = "not_ready"
	VerdictPass   = "pass"
	VerdictDrop   = "drop"
)

// sourceCollector reads a Source at every scrape and turns it into constant metrics.
type sourceCollector struct {
	src     Source
	timeout time.Duration
	now     func() time.Time
	log     *slog.Logger
	errs    *prometheus.CounterVec

	peers, peerReady, handshakeAge, rxBytes, txBytes *prometheus.Desc
	verdictPackets, verdictBytes, keyAge             *prometheus.Desc
}

func newSourceCollector(opts Options, errs *prometheus.CounterVec) *sourceCollector {
	name := func(n string) string { return prometheus.BuildFQName(Namespace, "", n) }
	return &sourceCollector{
		src: opts.Source, timeout: opts.ScrapeTimeout, now: opts.Now, log: opts.Logger, errs: errs,
		peers: prometheus.NewDesc(name("peers"),
			"WireGuard peers of this node by state: ready (configured with the peer's current key, endpoint and pod CIDRs) or not_ready.",
			[]string{"state"}, nil),
		peerReady: prometheus.NewDesc(name("peer_ready"),
			"1 if the peer is ready, else 0; fingerprint identifies the public key it is configured with.",
			[]string{"peer", "fingerprint"}, nil),
		handshakeAge: prometheus.NewDesc(name("peer_handshake_age_seconds"),
			"Seconds since the last completed WireGuard handshake with the peer; absent until the first one.",
			[]string{"peer"}, nil),
		rxBytes: prometheus.NewDesc(name("peer_receive_bytes_total"),
			"Bytes received from the peer through WireGuard.",
			[]string{"peer"}, nil),
		txBytes: prometheus.NewDesc(name("peer_transmit_bytes_total"),
			"Bytes sent to the peer through WireGuard.",
			[]string{"peer"}, nil),
		verdictPackets: prometheus.NewDesc(name("policy_verdict_packets_total"),
			"Packets the policy classifier passed or dropped, by reason; strict drops are reason drop_not_encrypted.",
			[]string{"reason", "verdict"}, nil),
		verdictBytes: prometheus.NewDesc(name("policy_verdict_bytes_total"),
			"Bytes the policy classifier passed or dropped, by reason.",
			[]string{"reason", "verdict"}, nil),
		keyAge: prometheus.NewDesc(name("key_age_seconds"),
			"Age of this node's WireGuard private key.",
			nil, nil),
	}
}

// Describe implements prometheus.Collector.
func (c *sourceCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.peers, c.peerReady, c.handshakeAge, c.rxBytes, c.txBytes, c.verdictPackets, c.verdictBytes, c.keyAge} {
		ch <- d
	}
}

// Collect implements prometheus.Collector.
func (c *sourceCollector) Collect(ch chan<- prometheus.Metric) {
	ctx, cancel := context.WithTimeout(context.Background(), c.timeout)
	defer cancel()
	if peers, err := c.src.Peers(ctx); err != nil {
		c.failed(sourcePeers, err)
	} else {
		c.collectPeers(ch, peers)
	}
	if verdicts, err := c.src.Verdicts(ctx); err != nil {
		c.failed(sourceVerdicts, err)
	} else {
		for _, v := range verdicts {
			verdict := VerdictPass
			if v.Dropped {
				verdict = VerdictDrop
			}
			ch <- prometheus.MustNewConstMetric(c.verdictPackets, prometheus.CounterValue, float64(v.Packets), v.Reason, verdict)
			ch <- prometheus.MustNewConstMetric(c.verdictBytes, prometheus.CounterValue, float64(v.Bytes), v.Reason, verdict)
		}
	}
	if age, ok := c.src.KeyAge(); ok {
		ch <- prometheus.MustNewConstMetric(c.keyAge, prometheus.GaugeValue, age.Seconds())
	}
}

func (c *sourceCollector) collectPeers(ch chan<- prometheus.Metric, peers []Peer) {
	now := c.now()
	var ready, notReady int
	for _, p := range peers {
		r := 0.0
		if p.Ready {
			ready++
			r = 1
		} else {
			notReady++
		}
		ch <- prometheus.MustNewConstMetric(c.peerReady, prometheus.GaugeValue, r, p.Name, p.Fingerprint)
		if !p.LastHandshake.IsZero() {
			age := max(now.Sub(p.LastHandshake), 0)
			ch <- prometheus.MustNewConstMetric(c.handshakeAge, prometheus.GaugeValue, age.Seconds(), p.Name)
		}
		ch <- prometheus.MustNewConstMetric(c.rxBytes, prometheus.CounterValue, float64(p.ReceiveBytes), p.Name)
		ch <- prometheus.MustNewConstMetric(c.txBytes, prometheus.CounterValue, float64(p.TransmitBytes), p.Name)
	}
	ch <- prometheus.MustNewConstMetric(c.peers, prometheus.GaugeValue, float64(ready), StateReady)
	ch <- prometheus.MustNewConstMetric(c.peers, prometheus.GaugeValue, float64(notReady), StateNotReady)
}

func (c *sourceCollector) failed(source string, err error) {
	c.errs.WithLabelValues(source).Inc()
	c.log.Warn("metrics: read agent state", "source", source, "err", err)
}

// xfrmCollector reads an XFRMSource at every scrape.
type xfrmCollector struct {
	src     XFRMSource
	timeout time.Duration
	log     *slog.Logger
	errs    *prometheus.CounterVec
	desc    *prometheus.Desc
}

func newXFRMCollector(opts Options, errs *prometheus.CounterVec) *xfrmCollector {
	return &xfrmCollector{
		src: opts.XFRM, timeout: opts.ScrapeTimeout, log: opts.Logger, errs: errs,
		// The kernel's values only grow (until reboot), hence a counter: rate() is what
		// one asks of them.
		desc: prometheus.NewDesc(prometheus.BuildFQName(Namespace, "", "xfrm_errors_total"),
			"The kernel's XFRM (IPsec) error counters from /proc/net/xfrm_stat, by field.",
			[]string{"field"}, nil),
	}
}

// Describe implements prometheus.Collector.
func (c *xfrmCollector) Describe(ch chan<- *prometheus.Desc) { ch <- c.desc }

// Collect implements prometheus.Collector.
func (c *xfrmCollector) Collect(ch chan<- prometheus.Metric) {
	ctx, cancel := context.WithTimeout(context.Background(), c.timeout)
	defer cancel()
	stats, err := c.src.XFRMStats(ctx)
	if err != nil {
		c.errs.WithLabelValues(sourceXFRM).Inc()
		c.log.Warn("metrics: read agent state", "source", sourceXFRM, "err", err)
		return
	}
	for field, v := range stats {
		ch <- prometheus.MustNewConstMetric(c.desc, prometheus.CounterValue, float64(v), field)
	}
}

// conntrackCollector reads a ConntrackSource at every scrape.
type conntrackCollector struct {
	src              ConntrackSource
	timeout          time.Duration
	log              *slog.Logger
	errs             *prometheus.CounterVec
	events, capacity *prometheus.Desc
}

func newConntrackCollector(opts Options, errs *prometheus.CounterVec) *conntrackCollector {
	return &conntrackCollector{
		src: opts.Conntrack, timeout: opts.ScrapeTimeout, log: opts.Logger, errs: errs,
		events: prometheus.NewDesc(prometheus.BuildFQName(Namespace, "policy", "connections_total"),
			"The policy classifier's connection table: connections entered (created), allowed first packets that could not be entered (create_failed), packets of a connection judged again after a policy or ipcache change (rejudged).",
			[]string{"event"}, nil),
		capacity: prometheus.NewDesc(prometheus.BuildFQName(Namespace, "policy", "connection_table_capacity"),
			"Connections the policy classifier's connection table holds (an LRU: --conntrack-size).", nil, nil),
	}
}

// Describe implements prometheus.Collector.
func (c *conntrackCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.events
	ch <- c.capacity
}

// Collect implements prometheus.Collector.
func (c *conntrackCollector) Collect(ch chan<- prometheus.Metric) {
	ctx, cancel := context.WithTimeout(context.Background(), c.timeout)
	defer cancel()
	st, ok, err := c.src.Conntrack(ctx)
	if err != nil {
		c.errs.WithLabelValues(sourceConntrack).Inc()
		c.log.Warn("metrics: read agent state", "source", sourceConntrack, "err", err)
		return
	}
	if !ok {
		return
	}
	ch <- prometheus.MustNewConstMetric(c.events, prometheus.CounterValue, float64(st.Created), ConnCreated)
	ch <- prometheus.MustNewConstMetric(c.events, prometheus.CounterValue, float64(st.CreateFailed), ConnCreateFailed)
	ch <- prometheus.MustNewConstMetric(c.events, prometheus.CounterValue, float64(st.Rejudged), ConnRejudged)
	ch <- prometheus.MustNewConstMetric(c.capacity, prometheus.GaugeValue, float64(st.Capacity))
}
