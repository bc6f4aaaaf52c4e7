package kube

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/meshcrypt/meshcrypt/pkg/api/v1alpha1"
	"github.com/meshcrypt/meshcrypt/pkg/identity"
)

// UnusedSinceAnnotation marks a MeshIdentity the collector found unused, with the time it first
// did (RFC 3339, fractional seconds kept so the grace period is never shortened).
const UnusedSinceAnnotation = "meshcrypt.io/unused-since"

// Defaults of GCOptions.
const (
	DefaultGrace      = 10 * time.Minute
	DefaultGCInterval = time.Minute
)

// GCOptions configure a GC.
type GCOptions struct {
	// Client reads and writes MeshIdentities; it must read through to the API server.
	// Required.
	Client client.Client
	// InUse returns the identities pods use now. Required. An error aborts the pass before
	// anything is written.
	InUse func(ctx context.Context) (map[identity.Identity]bool, error)
	// Cluster is this cluster's ID: identities of other clusters are not touched.
	Cluster uint8
	// Grace is how long an identity must stay unused before it is deleted; default
	// DefaultGrace.
	Grace time.Duration
	// Interval is the time between passes of Run (with 10% jitter); default
	// DefaultGCInterval.
	Interval time.Duration
	// Now is the clock; nil means time.Now.
	Now func() time.Time
	// Logger receives a line per deletion and per failed pass; nil discards them.
	Logger *slog.Logger
}

// GCStats count what one pass did.
type GCStats struct {
	// Seen counts the identities the pass considered (reserved and foreign ones excluded).
	Seen int
	// InUse counts those in use.
	InUse int
	// Marked counts identities newly marked unused; Unmarked those in use again.
	Marked, Unmarked int
	// Pending counts identities marked unused for less than the grace period.
	Pending int
	// Deleted counts deletions.
	Deleted int
	// Conflicts counts writes that lost to a concurrent write or deletion; the next pass
	// looks again.
	Conflicts int
}

// GC deletes MeshIdentities no pod has used for a grace period; see the package
// documentation for the protocol. Its methods may be called concurrently, and any number of
// GCs may run against one cluster.
type GC struct {
	opts GCOptions
	log  *slog.Logger
}

// NewGC returns a collector. It does no I/O. It panics if Client or InUse is nil.
func NewGC(opts GCOptions) *GC {
	if opts.Client == nil || opts.InUse == nil {
		panic("kube.NewGC: Client and InUse are required")
	}
	if opts.Grace <= 0 {
		opts.Grace = DefaultGrace
	}
	if opts.Interval <= 0 {
		opts.Interval = DefaultGCInterval
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &GC{opts: opts, log: log}
}

// Run collects every Interval until ctx ends, then returns nil. A failed pass is logged and
// retried at the next tick.
func (g *GC) Run(ctx context.Context) error {
	for {
		if st, err := g.Collect(ctx); err != nil {
			if ctx.Err() != nil {
				return nil
			}
			g.log.Warn("identity garbage collection failed", "err", err)
		} else if st.Deleted > 0 || st.Marked > 0 {
			g.log.Info("identity garbage collection", "seen", st.Seen, "marked", st.Marked, "deleted", st.Deleted)
		}
		jitter := time.Duration(rand.Int64N(int64(g.opts.Interval)/5+1)) - g.opts.Interval/10
		t := time.NewTimer(g.opts.Interval + jitter)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil
		case <-t.C:
		}
	}
}

// Collect makes one pass: list the identities, then ask InUse, then mark, unmark or delete.
// Write conflicts are counted, not errors; other write errors are joined and returned after the
// pass went through every identity.
func (g *GC) Collect(ctx context.Context) (GCStats, error) {
	var st GCStats
	var objs []*v1alpha1.MeshIdentity
	if err := listAll(ctx, g.opts.Client, func(mi *v1alpha1.MeshIdentity) { objs = append(objs, mi) }); err != nil {
		return st, fmt.Errorf("collect identities: %w", err)
	}
	inUse, err := g.opts.InUse(ctx)
	if err != nil {
		return st, fmt.Errorf("collect identities: in use: %w", err)
	}
	now := g.opts.Now()
	var errs []error
	for _, mi := range objs {
		id, err := identity.Parse(mi.Name)
		if err != nil || id.IsReserved() || id.Cluster() != g.opts.Cluster || mi.DeletionTimestamp != nil {
			continue
		}
		st.Seen++
		since, marked := unusedSince(mi, now, g.opts.Grace)
		switch {
		case inUse[id]:
			st.InUse++
			if _, ok := mi.Annotations[UnusedSinceAnnotation]; ok {
				delete(mi.Annotations, UnusedSinceAnnotation)
				errs = g.write(&st, &st.Unmarked, errs, id, "unmark", g.opts.Client.Update(ctx, mi))
			}
		case !marked:
			if mi.Annotations == nil {
				mi.Annotations = make(map[string]string)
			}
			mi.Annotations[UnusedSinceAnnotation] = now.UTC().Format(time.RFC3339Nano)
			errs = g.write(&st, &st.Marked, errs, id, "mark", g.opts.Client.Update(ctx, mi))
		case now.Sub(since) >= g.opts.Grace:
			uid, rv := mi.UID, mi.ResourceVersion
			err := g.opts.Client.Delete(ctx, mi, client.Preconditions{UID: &uid, ResourceVersion: &rv})
			errs = g.write(&st, &st.Deleted, errs, id, "delete", err)
			if err == nil {
				g.log.Info("deleted unused identity", "identity", id, "unusedSince", since, "labels", identity.FromMap(mi.Spec.Labels).Key())
			}
		default:
			st.Pending++
		}
	}
	if err := errors.Join(errs...); err != nil {
		return st, fmt.Errorf("collect identities: %w", err)
	}
	return st, nil
}

// write counts the outcome of one write: success in *ok, a lost race in st.Conflicts, anything
// else appended to errs.
func (g *GC) write(st *GCStats, ok *int, errs []error, id identity.Identity, what string, err error) []error {
	switch {
	case err == nil:
		*ok++
	case apierrors.IsConflict(err) || apierrors.IsNotFound(err):
		st.Conflicts++
		g.log.Debug("identity changed concurrently", "identity", id, "op", what, "err", err)
	default:
		errs = append(errs, fmt.Errorf("%s meshidentity %s: %w", what, id, err))
	}
	return errs
}

// unusedSince returns the time of mi's mark. A missing or unparsable mark, or one further in the
// future than the grace period (a wild clock), counts as no mark, so the pass marks it anew.
func unusedSince(mi *v1alpha1.MeshIdentity, now time.Time, grace time.Duration) (time.Time, bool) {
	v, ok := mi.Annotations[UnusedSinceAnnotation]
	if !ok {
		return time.Time{}, false
	}
	t, err := time.Parse(time.RFC3339, v)
	if err != nil || t.After(now.Add(grace)) {
		return time.Time{}, false
	}
	return t, true
}
