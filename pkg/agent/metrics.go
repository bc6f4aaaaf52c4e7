package agent

import (
	"context"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/meshcrypt/meshcrypt/pkg/crypto/ipsec"
	"github.com/meshcrypt/meshcrypt/pkg/crypto/wireguard"
	"github.com/meshcrypt/meshcrypt/pkg/datapath"
	"github.com/meshcrypt/meshcrypt/pkg/metrics"
)

var _ metrics.Source = (*Agent)(nil)

// xfrmStats is the agent's metrics.XFRMSource: the XFRM error counters of the node's
// namespace (/proc/net/xfrm_stat, where the agent runs). A kernel without XFRM statistics
// (CONFIG_XFRM_STATISTICS unset) has no such file and exports none.
type xfrmStats struct{}

var _ metrics.XFRMSource = xfrmStats{}

// XFRMStats implements metrics.XFRMSource.
func (xfrmStats) XFRMStats(context.Context) (map[string]uint64, error) {
	m, err := ipsec.ReadXfrmStat("")
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	return m, err
}

// Gatherer is what the agent's /metrics serves.
func (a *Agent) Gatherer() prometheus.Gatherer { return a.rec.Gatherer() }

// Ready is nil once the informers have synced and a reconcile has succeeded; /readyz serves
// it. Safe for concurrent use.
func (a *Agent) Ready() error {
	if !a.ready.Load() {
		return errors.New("not reconciled yet")
	}
	return nil
}

// Peers implements metrics.Source: the device's own view of its peers.
func (a *Agent) Peers(ctx context.Context) ([]metrics.Peer, error) {
	a.mu.Lock()
	dev, names, want := a.dev, a.nameByKey, a.peers
	a.mu.Unlock()
	if dev == nil || len(want) == 0 {
		return nil, nil
	}
	d, err := dev.Device(ctx)
	if err != nil {
		return nil, err
	}
	wantKey := map[string]string{}
	for _, p := range want {
		wantKey[p.Name] = p.PublicKey.String()
	}
	var out []metrics.Peer
	for _, p := range d.Peers {
		name, ok := names[p.PublicKey]
		if !ok {
			continue
		}
		out = append(out, metrics.Peer{
			Name:          name,
			Fingerprint:   wireguard.Fingerprint(p.PublicKey),
			LastHandshake: p.LastHandshakeTime,
			ReceiveBytes:  uint64(max(p.ReceiveBytes, 0)),
			TransmitBytes: uint64(max(p.TransmitBytes, 0)),
			Ready:         wantKey[name] == p.PublicKey.String(),
		})
	}
	return out, nil
}

// Verdicts implements metrics.Source: the classifier's counters by reason.
func (a *Agent) Verdicts(context.Context) ([]metrics.Verdict, error) {
	a.mu.Lock()
	clf := a.clf
	a.mu.Unlock()
	if clf == nil {
		return nil, nil
	}
	cs, err := clf.Counters()
	if err != nil {
		return nil, err
	}
	out := make([]metrics.Verdict, 0, len(cs))
	for r, c := range cs {
		out = append(out, metrics.Verdict{Reason: r.String(), Dropped: r.Dropped(), Packets: c.Packets, Bytes: c.Bytes})
	}
	return out, nil
}

// Conntrack implements metrics.ConntrackSource: the classifier's connection table counters.
func (a *Agent) Conntrack(context.Context) (metrics.Conntrack, bool, error) {
	a.mu.Lock()
	clf := a.clf
	a.mu.Unlock()
	if clf == nil {
		return metrics.Conntrack{}, false, nil
	}
	st, err := clf.ConntrackStats()
	if err != nil {
		return metrics.Conntrack{}, false, err
	}
	return metrics.Conntrack{Created: st.Created, CreateFailed: st.CreateFailed, Rejudged: st.Rejudged, Capacity: clf.ConntrackCapacity()}, true, nil
}

// KeyAge implements metrics.Source: the age of the private key file.
func (a *Agent) KeyAge() (time.Duration, bool) {
	fi, err := os.Stat(filepath.Join(a.opts.StateDir, KeyFileName))
	if err != nil {
		return 0, false
	}
	return time.Since(fi.ModTime()), true
}

// applyWireGuard applies cfg to the device and counts the configuration call it made, if any,
// with the peers it wrote and the nodes they belong to (meshcrypt_wireguard_configure_total,
// _peer_updates_total and _node_updates_total): Device.Apply makes exactly one wgctrl
// configuration call when its PlanStats report a change, and none otherwise. A node's key
// change is a remove and an add (WireGuard names peers by key), one node update; a prompted
// add's keepalive reset (wireguard.Peer.Prompt) rides in the same call and is part of the add.
func (a *Agent) applyWireGuard(ctx context.Context, cfg wireguard.Config) (wireguard.PlanStats, error) {
	st, err := a.dev.Apply(ctx, cfg)
	if err == nil && st.Changed() {
		a.rec.WireGuardConfigured(st.Added, st.Updated, st.Removed)
		a.rec.WireGuardNodesUpdated(st.Nodes())
	}
	return st, err
}

// applyRoutes applies cfg to the tunnel routes (see routeState for when it has nothing to do)
// and counts the netlink writes it made (meshcrypt_route_operations_total), also those made
// before an error: RouteStats counts every route replace and delete and every rule add and
// delete.
func (a *Agent) applyRoutes(ctx context.Context, cfg datapath.RouteConfig) (datapath.RouteStats, error) {
	return a.routeState.apply(ctx, a.nl, cfg, func(cfg datapath.RouteConfig) (datapath.RouteStats, error) {
		st, err := a.routes.Apply(ctx, cfg)
		a.rec.RouteOps(st.Added, st.Removed, st.RulesAdded, st.RulesRemoved)
		return st, err
	})
}
