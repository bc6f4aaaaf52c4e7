// Package metricstest holds a fake metrics.Source for tests of the metrics package and of
// what consumes its metrics (dashboards, alerts).
package metricstest

import (
	"context"
	"maps"
	"sync"
	"time"

	"github.com/meshcrypt/meshcrypt/pkg/metrics"
)

// Source is a metrics.Source returning what its fields hold. Set them with Set; the zero
// value has no peers, no verdicts and no key. Safe for concurrent use.
type Source struct {
	mu    sync.Mutex
	state State
}

// State is what a Source returns.
type State struct {
	Peers    []metrics.Peer
	Verdicts []metrics.Verdict
	// KeyAge is returned when HasKey is true.
	KeyAge time.Duration
	HasKey bool
	// PeersErr and VerdictsErr, when set, are returned instead of the data.
	PeersErr, VerdictsErr error
}

var _ metrics.Source = (*Source)(nil)

// Set replaces the state.
func (s *Source) Set(st State) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.state = st
}

// Peers implements metrics.Source.
func (s *Source) Peers(context.Context) ([]metrics.Peer, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.state.PeersErr != nil {
		return nil, s.state.PeersErr
	}
	return append([]metrics.Peer(nil), s.state.Peers...), nil
}

// Verdicts implements metrics.Source.
func (s *Source) Verdicts(context.Context) ([]metrics.Verdict, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.state.VerdictsErr != nil {
		return nil, s.state.VerdictsErr
	}
	return append([]metrics.Verdict(nil), s.state.Verdicts...), nil
}

// KeyAge implements metrics.Source.
func (s *Source) KeyAge() (time.Duration, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.state.KeyAge, s.state.HasKey
}

// XFRM is a metrics.XFRMSource returning a fixed map (or Err).
type XFRM struct {
	Stats map[string]uint64
	Err   error
}

var _ metrics.XFRMSource = XFRM{}

// XFRMStats implements metrics.XFRMSource.
func (x XFRM) XFRMStats(context.Context) (map[string]uint64, error) {
	if x.Err != nil {
		return nil, x.Err
	}
	return maps.Clone(x.Stats), nil
}

// Conntrack is a metrics.ConntrackSource returning fixed counters (Loaded false: none yet;
// or Err).
type Conntrack struct {
	Stats  metrics.Conntrack
	Loaded bool
	Err    error
}

var _ metrics.ConntrackSource = Conntrack{}

// Conntrack implements metrics.ConntrackSource.
func (c Conntrack) Conntrack(context.Context) (metrics.Conntrack, bool, error) {
	return c.Stats, c.Loaded, c.Err
}
