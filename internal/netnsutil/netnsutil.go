//go:build linux

// Package netnsutil runs code on an OS thread inside a network namespace, the one way to
// create sockets, TUN devices or TCX links in a namespace other than the process's. It is
// the single implementation the datapath, the WireGuard backends and the test harness share.
package netnsutil

import (
	"errors"
	"fmt"
	"runtime"

	"github.com/vishvananda/netns"
)

// OnLockedThread runs fn on a fresh goroutine locked to its OS thread and returns fn's
// error. fn may move the thread to another network namespace: afterwards the thread is moved
// back (only if it moved, so no setns and no CAP_SYS_ADMIN are needed otherwise); if that
// fails the thread stays locked, so the runtime ends it with the goroutine instead of running
// other goroutines in the wrong namespace.
func OnLockedThread(fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("get thread netns: %w", err)
			return
		}
		defer orig.Close()
		ferr := fn()
		if cur, err := netns.Get(); err == nil {
			same := cur.Equal(orig)
			cur.Close()
			if same {
				runtime.UnlockOSThread()
				errc <- ferr
				return
			}
		}
		if err := netns.Set(orig); err != nil {
			errc <- errors.Join(ferr, fmt.Errorf("restore thread netns: %w", err))
			return
		}
		runtime.UnlockOSThread()
		errc <- ferr
	}()
	return <-errc
}

// Do runs fn on an OS thread switched into ns (without a setns when the thread is already
// there). Sockets and processes fn creates belong to ns and stay there after Do returns;
// goroutines fn starts do not run in ns.
func Do(ns netns.NsHandle, fn func() error) error {
	return OnLockedThread(func() error {
		cur, err := netns.Get()
		if err != nil {
			return fmt.Errorf("get thread netns: %w", err)
		}
		defer cur.Close()
		if !cur.Equal(ns) {
			if err := netns.Set(ns); err != nil {
				return fmt.Errorf("enter netns: %w", err)
			}
		}
		return fn()
	})
}
