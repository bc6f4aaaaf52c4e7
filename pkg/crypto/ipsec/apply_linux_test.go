package ipsec_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/meshcrypt/meshcrypt/pkg/crypto/ipsec"
	"github.com/meshcrypt/meshcrypt/pkg/crypto/ipsec/ipsectest"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

func material(n int, seed byte) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = seed + byte(i)
	}
	return b
}

func keyring(t testing.TB, spis ...uint8) ipsec.Keyring {
	t.Helper()
	var keys []ipsec.Key
	for _, spi := range spis {
		k, err := ipsec.NewKey(spi, ipsec.AESGCM, material(20, spi*16), 0)
		if err != nil {
			t.Fatal(err)
		}
		keys = append(keys, k)
	}
	kr, err := ipsec.NewKeyring(keys...)
	if err != nil {
		t.Fatal(err)
	}
	return kr
}

func prefixes(s ...string) []netip.Prefix {
	out := make([]netip.Prefix, len(s))
	for i, p := range s {
		out[i] = netip.MustParsePrefix(p)
	}
	return out
}

var (
	fakeA = ipsec.Node{Name: "a", ID: 1, BootID: "boot-a", Underlay: netip.MustParseAddr("10.0.0.1"), PodCIDRs: prefixes("10.244.1.0/24", "fd44:0:0:1::/64")}
	fakeB = ipsec.Node{Name: "b", ID: 2, BootID: "boot-b", Underlay: netip.MustParseAddr("10.0.0.2"), PodCIDRs: prefixes("10.244.2.0/24", "fd44:0:0:2::/64")}
)

func plan(t testing.TB, local ipsec.Node, remotes []ipsec.Node, kr ipsec.Keyring, opts ipsec.PlanOptions) ipsec.Desired {
	t.Helper()
	d, err := ipsec.Plan(local, remotes, kr, opts)
	if err != nil {
		t.Fatal(err)
	}
	return d
}

// TestApplyOrder walks a node through its life (join, rotation, a peer's
// reboot, the peer leaving) and checks the exact operations, in order.
func TestApplyOrder(t *testing.T) {
	ctx := context.Background()
	k := ipsectest.NewKernel()
	x := ipsec.NewXFRM(k, ipsec.XFRMOptions{})
	rebooted := fakeB
	rebooted.BootID = "boot-b-2"
	steps := []struct {
		name    string
		desired ipsec.Desired
		stats   ipsec.Stats
		ops     []string
	}{
		{
			name:    "join",
			desired: plan(t, fakeA, []ipsec.Node{fakeB}, keyring(t, 1), ipsec.PlanOptions{}),
			stats:   ipsec.Stats{StatesAdded: 4, PoliciesAdded: 6},
			ops: []string{
				// The probes: IPv4 and IPv6 pods over an IPv4 underlay.
				"state add 192.0.2.2 spi=0xffffff0", "state del 192.0.2.2 spi=0xffffff0",
				"state add 192.0.2.2 spi=0xffffff0", "state del 192.0.2.2 spi=0xffffff0",
				"state add 10.0.0.1 spi=0x10002001", // in, IPv4 pods
				"state add 10.0.0.1 spi=0x10002801", // in, IPv6 pods
				"state add 10.0.0.2 spi=0x10001002", // out, IPv4 pods
				"state add 10.0.0.2 spi=0x10001802", // out, IPv6 pods
				"policy add out 10.244.1.0/24->10.244.2.0/24 spi=0x10001002",
				"policy add out fd44:0:0:1::/64->fd44:0:0:2::/64 spi=0x10001802",
				"policy add in 10.244.2.0/24->10.244.1.0/24 spi=0x0",
				"policy add in fd44:0:0:2::/64->fd44:0:0:1::/64 spi=0x0",
				"policy add fwd 10.244.2.0/24->10.244.1.0/24 spi=0x0",
				"policy add fwd fd44:0:0:2::/64->fd44:0:0:1::/64 spi=0x0",
			},
		},
		{
			name:    "again: nothing to do",
			desired: plan(t, fakeA, []ipsec.Node{fakeB}, keyring(t, 1), ipsec.PlanOptions{}),
		},
		{
			name:    "rotation 1: new key installed, outbound unchanged",
			desired: plan(t, fakeA, []ipsec.Node{fakeB}, keyring(t, 1, 2), ipsec.PlanOptions{OutboundSPI: 1}),
			stats:   ipsec.Stats{StatesAdded: 4},
			ops: []string{
				"state add 10.0.0.1 spi=0x20002001", "state add 10.0.0.1 spi=0x20002801",
				"state add 10.0.0.2 spi=0x20001002", "state add 10.0.0.2 spi=0x20001802",
			},
		},
		{
			name:    "rotation 2: outbound switched by in-place policy updates only",
			desired: plan(t, fakeA, []ipsec.Node{fakeB}, keyring(t, 1, 2), ipsec.PlanOptions{OutboundSPI: 2}),
			stats:   ipsec.Stats{PoliciesUpdated: 2},
			ops: []string{
				"policy update out 10.244.1.0/24->10.244.2.0/24 spi=0x20001002",
				"policy update out fd44:0:0:1::/64->fd44:0:0:2::/64 spi=0x20001802",
			},
		},
		{
			name:    "rotation 3: old key removed",
			desired: plan(t, fakeA, []ipsec.Node{fakeB}, keyring(t, 2), ipsec.PlanOptions{}),
			stats:   ipsec.Stats{StatesRemoved: 4},
			ops: []string{
				"state del 10.0.0.1 spi=0x10002001", "state del 10.0.0.1 spi=0x10002801",
				"state del 10.0.0.2 spi=0x10001002", "state del 10.0.0.2 spi=0x10001802",
			},
		},
		{
			name:    "peer rebooted: its states get new keys",
			desired: plan(t, fakeA, []ipsec.Node{rebooted}, keyring(t, 2), ipsec.PlanOptions{}),
			stats:   ipsec.Stats{StatesReplaced: 4},
			ops: []string{
				"state del 10.0.0.1 spi=0x20002001", "state add 10.0.0.1 spi=0x20002001",
				"state del 10.0.0.1 spi=0x20002801", "state add 10.0.0.1 spi=0x20002801",
				"state del 10.0.0.2 spi=0x20001002", "state add 10.0.0.2 spi=0x20001002",
				"state del 10.0.0.2 spi=0x20001802", "state add 10.0.0.2 spi=0x20001802",
			},
		},
		{
			name:    "peer left: policies go before states",
			desired: plan(t, fakeA, nil, keyring(t, 2), ipsec.PlanOptions{}),
			stats:   ipsec.Stats{StatesRemoved: 4, PoliciesRemoved: 6},
			ops: []string{
				"policy del in 10.244.2.0/24->10.244.1.0/24",
				"policy del in fd44:0:0:2::/64->fd44:0:0:1::/64",
				"policy del out 10.244.1.0/24->10.244.2.0/24",
				"policy del out fd44:0:0:1::/64->fd44:0:0:2::/64",
				"policy del fwd 10.244.2.0/24->10.244.1.0/24",
				"policy del fwd fd44:0:0:2::/64->fd44:0:0:1::/64",
				"state del 10.0.0.1 spi=0x20002001",
				"state del 10.0.0.1 spi=0x20002801",
				"state del 10.0.0.2 spi=0x20001002",
				"state del 10.0.0.2 spi=0x20001802",
			},
		},
	}
	for _, step := range steps {
		k.ResetOps()
		stats, err := x.Apply(ctx, step.desired)
		if err != nil {
			t.Fatalf("%s: Apply: %v", step.name, err)
		}
		if stats != step.stats {
			t.Errorf("%s: stats %v, want %v", step.name, stats, step.stats)
		}
		if diff := cmp.Diff(step.ops, k.Ops()); diff != "" {
			t.Errorf("%s: operations (-want +got):\n%s", step.name, diff)
		}
		checkMatches(t, step.name, k, step.desired, nil)
	}
	if s := k.String(); s != "" {
		t.Errorf("kernel not empty at the end:\n%s", s)
	}
}

// checkMatches asserts that the fake holds exactly d plus the foreign
// entries of foreign (a fake holding only those), by applying d to a
// copy of foreign and comparing.
func checkMatches(t *testing.T, what string, k *ipsectest.Kernel, d ipsec.Desired, foreign func(*ipsectest.Kernel)) {
	t.Helper()
	ref := ipsectest.NewKernel()
	if foreign != nil {
		foreign(ref)
	}
	if _, err := ipsec.NewXFRM(ref, ipsec.XFRMOptions{}).Apply(context.Background(), d); err != nil {
		t.Fatalf("%s: reference Apply: %v", what, err)
	}
	if diff := cmp.Diff(ref.String(), k.String()); diff != "" {
		t.Errorf("%s: kernel (-want +got):\n%s", what, diff)
	}
}

// TestApplyGolden pins the fake's sorted state after a dual-stack rotation
// step, keys shown as fingerprints.
func TestApplyGolden(t *testing.T) {
	k := ipsectest.NewKernel()
	x := ipsec.NewXFRM(k, ipsec.XFRMOptions{})
	if _, err := x.Apply(context.Background(), plan(t, fakeA, []ipsec.Node{fakeB}, keyring(t, 1, 2), ipsec.PlanOptions{OutboundSPI: 1})); err != nil {
		t.Fatal(err)
	}
	const (
		in4  = "10.0.0.2->10.0.0.1 esp spi=%#x reqid=0x6d637279 tunnel replay=32 sel 0.0.0.0/0->0.0.0.0/0 rfc4106(gcm(aes)) key=%%s icv=128\n"
		in6  = "10.0.0.2->10.0.0.1 esp spi=%#x reqid=0x6d637279 tunnel replay=32 sel ::/0->::/0 rfc4106(gcm(aes)) key=%%s icv=128\n"
		out4 = "10.0.0.1->10.0.0.2 esp spi=%#x reqid=0x6d637279 tunnel replay=0 sel 0.0.0.0/0->0.0.0.0/0 rfc4106(gcm(aes)) key=%%s icv=128\n"
		out6 = "10.0.0.1->10.0.0.2 esp spi=%#x reqid=0x6d637279 tunnel replay=0 sel ::/0->::/0 rfc4106(gcm(aes)) key=%%s icv=128\n"
	)
	want := "state " + fmt.Sprintf(in4, 0x10002001) + "state " + fmt.Sprintf(in6, 0x10002801) +
		"state " + fmt.Sprintf(in4, 0x20002001) + "state " + fmt.Sprintf(in6, 0x20002801) +
		"state " + fmt.Sprintf(out4, 0x10001002) + "state " + fmt.Sprintf(out6, 0x10001802) +
		"state " + fmt.Sprintf(out4, 0x20001002) + "state " + fmt.Sprintf(out6, 0x20001802) +
		`policy in 10.244.2.0/24->10.244.1.0/24 prio=4096 allow tmpl 10.0.0.2->10.0.0.1 esp tunnel spi=0x0 reqid=0x6d637279
policy in fd44:0:0:2::/64->fd44:0:0:1::/64 prio=4096 allow tmpl 10.0.0.2->10.0.0.1 esp tunnel spi=0x0 reqid=0x6d637279
policy out 10.244.1.0/24->10.244.2.0/24 prio=4096 allow tmpl 10.0.0.1->10.0.0.2 esp tunnel spi=0x10001002 reqid=0x6d637279
policy out fd44:0:0:1::/64->fd44:0:0:2::/64 prio=4096 allow tmpl 10.0.0.1->10.0.0.2 esp tunnel spi=0x10001802 reqid=0x6d637279
policy fwd 10.244.2.0/24->10.244.1.0/24 prio=4096 allow tmpl 10.0.0.2->10.0.0.1 esp tunnel spi=0x0 reqid=0x6d637279
policy fwd fd44:0:0:2::/64->fd44:0:0:1::/64 prio=4096 allow tmpl 10.0.0.2->10.0.0.1 esp tunnel spi=0x0 reqid=0x6d637279
`
	got := k.String()
	// Replace the fingerprints, checked separately, by %s.
	var fps []string
	for line := range strings.Lines(got) {
		if _, after, ok := strings.Cut(line, " key="); ok {
			fps = append(fps, strings.Fields(after)[0])
		}
	}
	masked := got
	for _, fp := range fps {
		masked = strings.Replace(masked, "key="+fp, "key=%s", 1)
	}
	if diff := cmp.Diff(want, masked); diff != "" {
		t.Errorf("kernel (-want +got):\n%s", diff)
	}
	if n := len(slices.Compact(slices.Sorted(slices.Values(fps)))); n != 8 {
		t.Errorf("key fingerprints not distinct: %v", fps)
	}
}

func TestApplyConflicts(t *testing.T) {
	ctx := context.Background()
	d := plan(t, fakeA, []ipsec.Node{fakeB}, keyring(t, 1), ipsec.PlanOptions{})
	foreignState := netlink.XfrmState{Src: net.ParseIP("10.0.0.9"), Dst: net.ParseIP("10.0.0.2").To4(), Proto: netlink.XFRM_PROTO_ESP,
		Mode: netlink.XFRM_MODE_TUNNEL, Spi: 0x10001002, Reqid: 7, Aead: &netlink.XfrmStateAlgo{Name: "rfc4106(gcm(aes))", Key: material(20, 0), ICVLen: 128}}
	_, sel, _ := net.ParseCIDR("10.244.1.0/24")
	_, dst, _ := net.ParseCIDR("10.244.2.0/24")
	foreignPolicy := netlink.XfrmPolicy{Src: sel, Dst: dst, Dir: netlink.XFRM_DIR_OUT, Tmpls: []netlink.XfrmPolicyTmpl{{Reqid: 7}}}
	unrelated := func(k *ipsectest.Kernel) {
		s := foreignState
		s.Spi = 0x1234
		k.AddForeignState(s)
		p := foreignPolicy
		_, p.Dst, _ = net.ParseCIDR("192.168.0.0/16")
		k.AddForeignPolicy(p)
		p.Dir = netlink.XFRM_DIR_IN
		p.Tmpls = nil // a bypass policy: no template at all
		k.AddForeignPolicy(p)
	}

	for _, tt := range []struct {
		name  string
		setup func(k *ipsectest.Kernel)
	}{
		{"foreign state on our SPI", func(k *ipsectest.Kernel) { k.AddForeignState(foreignState) }},
		{"foreign policy on our selector", func(k *ipsectest.Kernel) { k.AddForeignPolicy(foreignPolicy) }},
	} {
		t.Run(tt.name, func(t *testing.T) {
			k := ipsectest.NewKernel()
			tt.setup(k)
			before := k.String()
			x := ipsec.NewXFRM(k, ipsec.XFRMOptions{})
			k.ResetOps()
			_, err := x.Apply(ctx, d)
			if !errors.Is(err, ipsec.ErrConflict) {
				t.Fatalf("Apply error = %v, want ErrConflict", err)
			}
			for _, op := range k.Ops() {
				if !strings.Contains(op, " 192.0.2.2 ") { // the probes
					t.Errorf("Apply changed the kernel despite the conflict: %v", op)
				}
			}
			if k.String() != before {
				t.Errorf("kernel changed:\n%s", k.String())
			}
		})
	}

	t.Run("foreign entries are never touched", func(t *testing.T) {
		k := ipsectest.NewKernel()
		unrelated(k)
		x := ipsec.NewXFRM(k, ipsec.XFRMOptions{})
		if _, err := x.Apply(ctx, d); err != nil {
			t.Fatal(err)
		}
		checkMatches(t, "apply", k, d, unrelated)
		if _, err := x.Apply(ctx, ipsec.Desired{}); err != nil {
			t.Fatal(err)
		}
		checkMatches(t, "clear", k, ipsec.Desired{}, unrelated)
		if !strings.Contains(k.String(), "spi=0x1234") || strings.Count(k.String(), "policy") != 2 {
			t.Errorf("foreign entries gone:\n%s", k.String())
		}
	})
}

func TestApplyNotSupported(t *testing.T) {
	ctx := context.Background()
	k := ipsectest.NewKernel()
	k.SetESPUnsupported(true)
	if err := ipsec.Supported(k); !errors.Is(err, ipsec.ErrNotSupported) || !errors.Is(err, unix.EPROTONOSUPPORT) {
		t.Errorf("Supported = %v, want ErrNotSupported wrapping EPROTONOSUPPORT", err)
	}
	x := ipsec.NewXFRM(k, ipsec.XFRMOptions{})
	d := plan(t, fakeA, []ipsec.Node{fakeB}, keyring(t, 1), ipsec.PlanOptions{})
	stats, err := x.Apply(ctx, d)
	if !errors.Is(err, ipsec.ErrNotSupported) {
		t.Fatalf("Apply = %v, want ErrNotSupported", err)
	}
	if stats.Changed() || len(k.Ops()) != 0 || k.String() != "" {
		t.Errorf("Apply installed something without ESP: %v %v\n%s", stats, k.Ops(), k)
	}
	// Clearing needs no ESP.
	if _, err := x.Apply(ctx, ipsec.Desired{}); err != nil {
		t.Errorf("Apply(empty) without ESP: %v", err)
	}
	// Support appears (a module loaded): Apply probes again.
	k.SetESPUnsupported(false)
	if _, err := x.Apply(ctx, d); err != nil {
		t.Errorf("Apply once ESP is there: %v", err)
	}
	if err := ipsec.Supported(k); err != nil {
		t.Errorf("Supported: %v", err)
	}
}

func TestApplyDumpInterrupted(t *testing.T) {
	ctx := context.Background()
	d := plan(t, fakeA, []ipsec.Node{fakeB}, keyring(t, 1), ipsec.PlanOptions{})
	k := ipsectest.NewKernel()
	x := ipsec.NewXFRM(k, ipsec.XFRMOptions{})
	if _, err := x.Apply(ctx, d); err != nil {
		t.Fatal(err)
	}
	// A few interruptions: retried, and the partial dumps must not make
	// Apply believe states or policies are missing (or stale).
	k.InterruptDumps(5)
	k.ResetOps()
	stats, err := x.Apply(ctx, d)
	if err != nil || stats.Changed() || len(k.Ops()) != 0 {
		t.Errorf("Apply after interrupted dumps: %v, %v, ops %v", stats, err, k.Ops())
	}
	// Endless interruptions: an error, nothing changed.
	k.InterruptDumps(1000)
	_, err = x.Apply(ctx, plan(t, fakeA, nil, keyring(t, 1), ipsec.PlanOptions{}))
	if !errors.Is(err, netlink.ErrDumpInterrupted) {
		t.Errorf("Apply with every dump interrupted = %v, want ErrDumpInterrupted", err)
	}
	if len(k.Ops()) != 0 {
		t.Errorf("Apply changed the kernel from a partial dump: %v", k.Ops())
	}
}

func TestApplyFailureMidway(t *testing.T) {
	ctx := context.Background()
	k := ipsectest.NewKernel()
	x := ipsec.NewXFRM(k, ipsec.XFRMOptions{})
	d1 := plan(t, fakeA, []ipsec.Node{fakeB}, keyring(t, 1, 2), ipsec.PlanOptions{OutboundSPI: 1})
	if _, err := x.Apply(ctx, d1); err != nil {
		t.Fatal(err)
	}
	d2 := plan(t, fakeA, []ipsec.Node{fakeB}, keyring(t, 2), ipsec.PlanOptions{})
	boom := errors.New("boom")
	k.FailNext("policy update", boom)
	k.ResetOps()
	stats, err := x.Apply(ctx, d2)
	if !errors.Is(err, boom) || stats.PoliciesUpdated != 0 || stats.StatesRemoved != 0 {
		t.Fatalf("Apply = %v, %v; want the injected error before any removal", stats, err)
	}
	if n := len(k.Policies()); n != 6 {
		t.Errorf("%d policies after the failure, want all 6", n)
	}
	if _, err := x.Apply(ctx, d2); err != nil {
		t.Fatal(err)
	}
	checkMatches(t, "after retry", k, d2, nil)
}

func TestApplyKeyReuse(t *testing.T) {
	ctx := context.Background()
	k := ipsectest.NewKernel()
	x := ipsec.NewXFRM(k, ipsec.XFRMOptions{})
	d := plan(t, fakeA, []ipsec.Node{fakeB}, keyring(t, 1), ipsec.PlanOptions{})
	if _, err := x.Apply(ctx, d); err != nil {
		t.Fatal(err)
	}
	// Someone changed the outbound state behind Apply's back (here: its
	// replay window), keeping its key.
	var out netlink.XfrmState
	for _, s := range k.States() {
		if s.Dst.Equal(net.ParseIP("10.0.0.2")) {
			out = s
		}
	}
	if err := k.XfrmStateDel(&out); err != nil {
		t.Fatal(err)
	}
	out.ReplayWindow = 8
	if err := k.XfrmStateAdd(&out); err != nil {
		t.Fatal(err)
	}
	k.ResetOps()
	if _, err := x.Apply(ctx, d); !errors.Is(err, ipsec.ErrKeyReuse) {
		t.Errorf("Apply = %v, want ErrKeyReuse", err)
	}
	if len(k.Ops()) != 0 {
		t.Errorf("Apply changed the kernel: %v", k.Ops())
	}
}

func TestApplyValidation(t *testing.T) {
	ctx := context.Background()
	d := plan(t, fakeA, []ipsec.Node{fakeB}, keyring(t, 1), ipsec.PlanOptions{})
	for _, tt := range []struct {
		name    string
		edit    func(d *ipsec.Desired)
		wantErr string
	}{
		{"other reqid", func(d *ipsec.Desired) { d.States[0].ReqID = 1 }, "reqid 0x1 is not the XFRM's 0x6d637279"},
		{"policy reqid", func(d *ipsec.Desired) { d.Policies[0].ReqID = 1 }, "reqid 0x1 is not the XFRM's"},
		{"short key", func(d *ipsec.Desired) { d.States[0].Key = d.States[0].Key[:10] }, "key is 10 bytes"},
		{"reserved SPI", func(d *ipsec.Desired) { d.States[0].SPI = 3 }, "SPI 0x3 in the reserved range"},
		{"duplicate state", func(d *ipsec.Desired) { d.States = append(d.States, d.States[0]) }, "duplicate (destination, SPI)"},
		{"duplicate policy", func(d *ipsec.Desired) { d.Policies = append(d.Policies, d.Policies[0]) }, "duplicate (direction, selector)"},
		{"mixed selector", func(d *ipsec.Desired) { d.Policies[0].Dst = netip.MustParsePrefix("fd00::/64") }, "selector must be two valid prefixes of one family"},
		{"optional out", func(d *ipsec.Desired) { d.Policies[0].Optional = true }, "outbound template cannot be optional"},
		{"state direction", func(d *ipsec.Desired) { d.States[0].Dir = ipsec.DirFwd }, "direction fwd"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			dd := ipsec.Desired{States: slices.Clone(d.States), Policies: slices.Clone(d.Policies)}
			tt.edit(&dd)
			k := ipsectest.NewKernel()
			_, err := ipsec.NewXFRM(k, ipsec.XFRMOptions{}).Apply(ctx, dd)
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Errorf("Apply error = %v, want %q", err, tt.wantErr)
			}
			if k.String() != "" {
				t.Errorf("Apply of an invalid Desired changed the kernel")
			}
		})
	}
}

func TestStatus(t *testing.T) {
	ctx := context.Background()
	k := ipsectest.NewKernel()
	x := ipsec.NewXFRM(k, ipsec.XFRMOptions{})
	if _, err := x.Apply(ctx, plan(t, fakeA, []ipsec.Node{fakeB}, keyring(t, 3), ipsec.PlanOptions{})); err != nil {
		t.Fatal(err)
	}
	st, err := x.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, s := range st {
		got = append(got, fmt.Sprintf("%s %s %s->%s spi=%#x key=%d src=%d ipv6=%v %s used=%v", s.Dir, s.Node, s.Src, s.Dst, s.SPI, s.KeyringSPI, s.SrcID, s.IPv6, s.Algorithm, s.SeqUsed()))
	}
	want := []string{
		"in b 10.0.0.2->10.0.0.1 spi=0x30002001 key=3 src=2 ipv6=false rfc4106(gcm(aes)) used=0",
		"in b 10.0.0.2->10.0.0.1 spi=0x30002801 key=3 src=2 ipv6=true rfc4106(gcm(aes)) used=0",
		"out b 10.0.0.1->10.0.0.2 spi=0x30001002 key=3 src=1 ipv6=false rfc4106(gcm(aes)) used=0",
		"out b 10.0.0.1->10.0.0.2 spi=0x30001802 key=3 src=1 ipv6=true rfc4106(gcm(aes)) used=0",
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("Status (-want +got):\n%s", diff)
	}
	half := ipsec.SAStatus{Dir: ipsec.DirOut, OutSeq: ipsec.SeqLimit / 2}
	if u := half.SeqUsed(); u < 0.49 || u > 0.51 {
		t.Errorf("SeqUsed = %v, want 0.5", u)
	}
}

func TestOutboundTunnels(t *testing.T) {
	ctx := context.Background()
	k := ipsectest.NewKernel()
	x := ipsec.NewXFRM(k, ipsec.XFRMOptions{})
	b, c := fakeB, fakeB
	c.Name, c.ID, c.Underlay = "c", 3, netip.MustParseAddr("10.0.0.3")
	c.PodCIDRs = []netip.Prefix{netip.MustParsePrefix("10.244.3.0/24")}
	c.InboundOnly = true
	if _, err := x.Apply(ctx, plan(t, fakeA, []ipsec.Node{b, c}, keyring(t, 3), ipsec.PlanOptions{})); err != nil {
		t.Fatal(err)
	}
	got, err := x.OutboundTunnels(ctx)
	if err != nil {
		t.Fatal(err)
	}
	want := map[netip.Addr]bool{b.Underlay: true} // c is inbound only: no out policy
	if diff := cmp.Diff(want, got, cmp.Comparer(func(a, b netip.Addr) bool { return a == b })); diff != "" {
		t.Errorf("OutboundTunnels (-want +got):\n%s", diff)
	}
}

// TestApplyRandomTransitions drives a node through random cluster changes
// (nodes joining, leaving, rebooting and moving, pod CIDRs changing, keys
// rotating) and checks, after every single kernel operation, that:
//   - no policy that is desired both before and after the change is ever
//     missing (no window in which its traffic would go in clear);
//   - every outbound policy's template names an existing state, unless that
//     state is being re-keyed (no window of loss otherwise);
//
// and after each Apply that the kernel is exactly the plan and a second
// Apply changes nothing.
func TestApplyRandomTransitions(t *testing.T) {
	ctx := context.Background()
	rng := rand.New(rand.NewPCG(7, 11))
	type cluster struct {
		local   ipsec.Node
		remotes map[string]ipsec.Node
		spis    []uint8
		out     uint8
		opts    ipsec.PlanOptions
	}
	underlay := func() netip.Addr { return netip.AddrFrom4([4]byte{10, 0, 0, byte(1 + rng.IntN(30))}) }
	newNode := func(name string, id int) ipsec.Node {
		n := ipsec.Node{Name: name, ID: uint16(id), BootID: fmt.Sprintf("boot-%d", rng.Uint32()), Underlay: underlay(),
			PodCIDRs: prefixes(fmt.Sprintf("10.%d.%d.0/24", 100+id, rng.IntN(4)))}
		if rng.IntN(2) == 0 {
			n.PodCIDRs = append(n.PodCIDRs, netip.MustParsePrefix(fmt.Sprintf("fd44:%x:0:%x::/64", id, rng.IntN(4))))
		}
		return n
	}
	c := cluster{local: newNode("local", 1), remotes: map[string]ipsec.Node{}, spis: []uint8{1}, out: 1}
	desired := func() ipsec.Desired {
		var rs []ipsec.Node
		for _, r := range c.remotes {
			rs = append(rs, r)
		}
		kr := keyring(t, c.spis...)
		opts := c.opts
		opts.OutboundSPI = c.out
		return plan(t, c.local, rs, kr, opts)
	}

	k := ipsectest.NewKernel()
	x := ipsec.NewXFRM(k, ipsec.XFRMOptions{})
	var (
		keepPolicies map[string]bool // (dir, selector) desired before and after
		rekeyed      map[string]bool // state IDs whose key changes
		violations   []string
	)
	policyID := func(dir string, src, dst fmt.Stringer) string { return dir + " " + src.String() + "->" + dst.String() }
	k.OnChange(func(op string) {
		have := map[string]bool{}
		for _, p := range k.Policies() {
			src, _ := netip.AddrFromSlice(p.Src.IP)
			dst, _ := netip.AddrFromSlice(p.Dst.IP)
			so, _ := p.Src.Mask.Size()
			do, _ := p.Dst.Mask.Size()
			have[policyID(strings.TrimPrefix(p.Dir.String(), "dir "), netip.PrefixFrom(src.Unmap(), so), netip.PrefixFrom(dst.Unmap(), do))] = true
		}
		for id := range keepPolicies {
			if !have[id] {
				violations = append(violations, fmt.Sprintf("after %q: policy %s missing", op, id))
			}
		}
		states := map[string]bool{}
		for _, s := range k.States() {
			dst, _ := netip.AddrFromSlice(s.Dst)
			states[fmt.Sprintf("%s/%#x", dst.Unmap(), uint32(s.Spi))] = true
		}
		for _, p := range k.Policies() {
			if p.Dir != netlink.XFRM_DIR_OUT || len(p.Tmpls) != 1 || p.Tmpls[0].Reqid != int(ipsec.DefaultReqID) {
				continue
			}
			dst, _ := netip.AddrFromSlice(p.Tmpls[0].Dst)
			id := fmt.Sprintf("%s/%#x", dst.Unmap(), uint32(p.Tmpls[0].Spi))
			if !states[id] && !rekeyed[id] {
				violations = append(violations, fmt.Sprintf("after %q: out policy %v->%v points at missing state %s", op, p.Src, p.Dst, id))
			}
		}
	})

	prev := ipsec.Desired{}
	for step := range 400 {
		var what string
		names := slices.Sorted(func(yield func(string) bool) {
			for n := range c.remotes {
				if !yield(n) {
					return
				}
			}
		})
		pick := func() (ipsec.Node, bool) {
			if len(names) == 0 {
				return ipsec.Node{}, false
			}
			return c.remotes[names[rng.IntN(len(names))]], true
		}
		switch r := rng.IntN(10); {
		case r < 2 && len(c.remotes) < 5:
			id := 2 + rng.IntN(8)
			name := fmt.Sprintf("n%d", id)
			c.remotes[name] = newNode(name, id)
			what = "join " + name
		case r < 3:
			if n, ok := pick(); ok {
				delete(c.remotes, n.Name)
				what = "leave " + n.Name
			}
		case r < 4:
			if n, ok := pick(); ok {
				n.BootID += "'"
				c.remotes[n.Name] = n
				what = "reboot " + n.Name
			}
		case r < 5:
			if n, ok := pick(); ok {
				n.Underlay = underlay()
				c.remotes[n.Name] = n
				what = "move " + n.Name
			}
		case r < 6:
			if n, ok := pick(); ok {
				n.PodCIDRs = newNode(n.Name, int(n.ID)).PodCIDRs
				c.remotes[n.Name] = n
				what = "re-CIDR " + n.Name
			}
		case r < 7:
			if len(c.spis) < 4 && c.spis[len(c.spis)-1] < ipsec.MaxSPI {
				c.spis = append(c.spis, c.spis[len(c.spis)-1]+1)
				what = "add key"
			} else {
				c.spis = slices.DeleteFunc(c.spis, func(s uint8) bool { return s != c.out && s == c.spis[0] })
				what = "remove old key"
			}
		case r < 8:
			c.out = c.spis[rng.IntN(len(c.spis))]
			what = fmt.Sprintf("outbound key %d", c.out)
		case r < 9:
			switch rng.IntN(3) {
			case 0:
				c.local.BootID += "'"
				what = "local reboot"
			case 1:
				c.local.Underlay = underlay()
				what = "local move"
			default:
				c.opts.AcceptPlaintext = !c.opts.AcceptPlaintext
				what = "accept plaintext toggled"
			}
		default:
			c.opts.Priority = uint32(rng.IntN(3)) * 100
			what = "priority"
		}
		next := desired()
		keepPolicies, rekeyed = map[string]bool{}, map[string]bool{}
		nextPol := map[string]bool{}
		for _, p := range next.Policies {
			nextPol[policyID(p.Dir.String(), p.Src, p.Dst)] = true
		}
		for _, p := range prev.Policies {
			if id := policyID(p.Dir.String(), p.Src, p.Dst); nextPol[id] {
				keepPolicies[id] = true
			}
		}
		for _, s := range next.States {
			for _, o := range prev.States {
				if o.Dst == s.Dst && o.SPI == s.SPI && !bytes.Equal(o.Key, s.Key) {
					rekeyed[fmt.Sprintf("%s/%#x", s.Dst, s.SPI)] = true
				}
			}
		}
		if _, err := x.Apply(ctx, next); err != nil {
			t.Fatalf("step %d (%s): Apply: %v", step, what, err)
		}
		if len(violations) > 0 {
			t.Fatalf("step %d (%s):\n%s", step, what, strings.Join(violations, "\n"))
		}
		checkMatches(t, fmt.Sprintf("step %d (%s)", step, what), k, next, nil)
		k.ResetOps()
		if st, err := x.Apply(ctx, next); err != nil || st.Changed() || len(k.Ops()) != 0 {
			t.Fatalf("step %d (%s): second Apply: %v, %v, %v", step, what, st, err, k.Ops())
		}
		prev = next
	}
}
