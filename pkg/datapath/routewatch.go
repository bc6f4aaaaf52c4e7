package datapath

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// routeWatchRetry is how long WatchRouteDeletions waits before it subscribes again after the
// subscription failed.
const routeWatchRetry = time.Second

// routeWatchBuffer is the socket receive buffer of the subscription: an agent start installs
// two routes per remote pod CIDR (10000 route messages at 5000 nodes) while the watch reads.
const routeWatchBuffer = 4 << 20

// RouteWatchOptions configure WatchRouteDeletions.
type RouteWatchOptions struct {
	// NS is the network namespace whose routes are watched.
	NS netns.NsHandle
	// Table is the routing table whose deletions are reported; 0 means DefaultTable.
	Table int
	// Deleted is called, on the watch's goroutine, for every route deleted from Table, and
	// whenever deletions may have gone unseen. It must not block. Required.
	Deleted func()
	// Logger receives subscription failures; nil discards them.
	Logger *slog.Logger
}

// WatchRouteDeletions calls opts.Deleted for every route deleted from opts.Table in opts.NS,
// whoever deleted it, until ctx ends, so the caller can repair its routes at once instead of
// at its next full Apply. When the subscription fails or the kernel drops messages it calls
// Deleted too (a deletion may have been among them) and subscribes again. It blocks and
// returns ctx's error.
//
// The kernel does not announce every deletion: IPv4 routes that go with their device (a
// deleted link) vanish without a message. Callers must also Apply in full when the device was
// replaced, and periodically.
func WatchRouteDeletions(ctx context.Context, opts RouteWatchOptions) error {
	if opts.Deleted == nil {
		return errors.New("watch route deletions: no Deleted callback")
	}
	if opts.Table == 0 {
		opts.Table = DefaultTable
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	for {
		err := watchRouteDeletions(ctx, opts)
		if ctx.Err() != nil {
			return ctx.Err()
		}
		log.Warn("route watch failed; subscribing again", "err", err, "retryIn", routeWatchRetry)
		opts.Deleted()
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(routeWatchRetry):
		}
	}
}

// watchRouteDeletions runs one subscription until it fails or ctx ends.
func watchRouteDeletions(ctx context.Context, opts RouteWatchOptions) error {
	ch := make(chan netlink.RouteUpdate, 256)
	done := make(chan struct{})
	errs := make(chan error, 1)
	if err := netlink.RouteSubscribeWithOptions(ch, done, netlink.RouteSubscribeOptions{
		Namespace:         &opts.NS,
		ReceiveBufferSize: routeWatchBuffer,
		ErrorCallback: func(err error) {
			select {
			case errs <- err:
			default:
			}
		},
	}); err != nil {
		return fmt.Errorf("subscribe to route changes: %w", err)
	}
	defer func() {
		close(done) // closes the socket: the receiving goroutine ends and closes ch
		for range ch {
		}
	}()
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case err := <-errs:
			// A message lost (ENOBUFS) or unreadable: it may have been a deletion. A receive
			// failure also closes ch.
			return fmt.Errorf("route subscription: %w", err)
		case u, ok := <-ch:
			if !ok {
				return errors.New("route subscription ended")
			}
			if u.Type == unix.RTM_DELROUTE && u.Table == opts.Table {
				opts.Deleted()
			}
		}
	}
}
