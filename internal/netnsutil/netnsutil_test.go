//go:build linux

package netnsutil_test

import (
	"errors"
	"testing"

	"github.com/vishvananda/netns"

	"github.com/meshcrypt/meshcrypt/internal/netnsutil"
	"github.com/meshcrypt/meshcrypt/internal/testutil"
)

func TestDoRunsInsideAndRestores(t *testing.T) {
	target, _ := testutil.NewNetNS(t)
	before, err := netns.Get()
	if err != nil {
		t.Fatal(err)
	}
	defer before.Close()
	want := errors.New("from fn")
	var inside bool
	err = netnsutil.Do(target, func() error {
		cur, err := netns.Get()
		if err != nil {
			return err
		}
		defer cur.Close()
		inside = cur.Equal(target)
		return want
	})
	if !errors.Is(err, want) {
		t.Fatalf("Do returned %v, want fn's error", err)
	}
	if !inside {
		t.Fatal("fn did not run in the target namespace")
	}
	// Later work on any thread is back in the original namespace.
	for range 20 {
		err := netnsutil.OnLockedThread(func() error {
			cur, err := netns.Get()
			if err != nil {
				return err
			}
			defer cur.Close()
			if !cur.Equal(before) {
				return errors.New("a thread was left in the target namespace")
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}
}

func TestOnLockedThreadRestoresWhatFnMoved(t *testing.T) {
	target, _ := testutil.NewNetNS(t)
	var after netns.NsHandle
	err := netnsutil.OnLockedThread(func() error {
		if err := netns.Set(target); err != nil {
			return err
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	err = netnsutil.OnLockedThread(func() error {
		var err error
		after, err = netns.Get()
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	defer after.Close()
	if after.Equal(target) {
		t.Fatal("a thread fn moved was not restored")
	}
}
