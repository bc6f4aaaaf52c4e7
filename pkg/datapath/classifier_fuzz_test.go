package datapath

import (
	"context"
	"errors"
	"testing"
)

// FuzzClassifier feeds arbitrary frames to both programs, with flow events on: the kernel
// must always run them (no error), the verdict is always pass or drop, the counted reason is
// the model's, and an IP packet's event carries that reason.
// Seeded from the unit table; `go test -fuzz FuzzClassifier ./pkg/datapath` explores further.
func FuzzClassifier(f *testing.F) {
	c := newTestClassifier(f, ClassifierOptions{})
	ctx := context.Background()
	m := &model{
		ipcache: fixtureIPCache(),
		policy: map[PolicyKey]PolicyValue{
			{idA, idB, 80, protoTCP, Egress}:      {},
			{idA, 0, 53, protoUDP, Egress}:        {},
			{idA, idC, 0, 0, Egress}:              {Flags: PolicyEncrypt},
			{idA, identityWorld, 0, 0, Egress}:    {},
			{idB, idA, 0, protoTCP, Ingress}:      {},
			{idB, identityWorld, 0, 0, Ingress}:   {},
			{idC, 0, 0, protoICMPv6, Ingress}:     {},
			{idD, idA, 443, protoTCP, Ingress}:    {},
			{idD, 0, 0, protoSCTP, Ingress}:       {},
			{identityWorld, 0, 0, 0, Egress}:      {},
			{idB, idC, 8080, protoTCP, Ingress}:   {Flags: PolicyEncrypt},
			{idA, idD, 0, protoICMP, Egress}:      {},
			{idA, idB, 0, protoICMPv6, Egress}:    {},
			{idC, idA, 0, protoTCP, Ingress}:      {},
			{idB, idA, 1234, protoUDP, Ingress}:   {},
			{idA, idA, 0, 0, Egress}:              {},
			{idD, identityWorld, 0, 0, Ingress}:   {},
			{identityWorld, idB, 0, 0, Ingress}:   {},
			{identityWorld, idA, 22, protoTCP, 1}: {},
		},
		enforce: map[EnforceKey]EnforceValue{
			{idA, Egress}:  {EnforceDeny},
			{idB, Ingress}: {EnforceDeny},
			{idC, Ingress}: {EnforceDeny | EnforceEncrypt},
			{idD, Ingress}: {EnforceDeny},
		},
	}
	if _, err := c.ApplyIPCache(ctx, m.ipcache); err != nil {
		f.Fatal(err)
	}
	if _, err := c.ApplyPolicy(ctx, m.policy, m.enforce); err != nil {
		f.Fatal(err)
	}
	if err := c.SetFlowEvents(allEvents); err != nil {
		f.Fatal(err)
	}
	r := newFlowReader(f, c)
	for _, tt := range verdictCases() {
		f.Add(tt.bytes(), !tt.toPod)
	}
	f.Add(arpFrame(), true)
	f.Add([]byte{}, true)

	f.Fuzz(func(t *testing.T, frame []byte, fromPod bool) {
		if len(frame) > 1600 {
			frame = frame[:1600] // BPF_PROG_TEST_RUN takes at most a page
		}
		prog := c.objs.FromPod
		if !fromPod {
			prog = c.objs.ToPod
		}
		verdict, got, err := c.tryRun(prog, frame)
		if errors.Is(err, errRefused) {
			return
		}
		if err != nil {
			t.Fatal(err)
		}
		want := m.classify(fromPod, frame)
		if got != want {
			pkt, kind := modelParse(frame)
			t.Errorf("classifier says %s, model %s (parsed %+v, kind %d)", got, want, pkt, kind)
		}
		if wantVerdict := map[bool]uint32{false: verdictPass, true: verdictDrop}[got.Dropped()]; verdict != wantVerdict {
			t.Errorf("verdict %d for reason %s", verdict, got)
		}
		if got == ReasonPassNonIP {
			if !ringEmpty(r) {
				t.Errorf("an event for a non-IP frame")
			}
			return
		}
		if ev := readFlow(t, r); ev.Reason != got || ev.Length != uint32(len(frame)) || !ringEmpty(r) {
			t.Errorf("event %+v for a %d-byte frame counted as %s", ev, len(frame), got)
		}
	})
}
