package main

import (
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/meshcrypt/meshcrypt/pkg/api/v1alpha1"
)

func TestVerifyPairs(t *testing.T) {
	nodes := []string{"c", "a", "b"}
	got, err := verifyPairs(nodes, verifyOptions{allPairs: true})
	if err != nil {
		t.Fatal(err)
	}
	want := []v1alpha1.VerificationPair{{From: "a", To: "b"}, {From: "a", To: "c"}, {From: "b", To: "c"}}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("all pairs (-want +got):\n%s", diff)
	}
	if got, err := verifyPairs(nodes, verifyOptions{from: "c", to: "a"}); err != nil || len(got) != 1 || got[0].From != "c" {
		t.Errorf("from c to a: %v, %v", got, err)
	}
	if _, err := verifyPairs(nodes, verifyOptions{from: "a", to: "x"}); err == nil || !strings.Contains(err.Error(), `node "x" not found`) {
		t.Errorf("unknown node: %v", err)
	}
	if _, err := verifyPairs([]string{"a"}, verifyOptions{allPairs: true}); err == nil {
		t.Error("all pairs of one node: no error")
	}
}

func TestVerifySummary(t *testing.T) {
	pairs := []v1alpha1.VerificationPair{{From: "a", To: "b"}, {From: "a", To: "c"}, {From: "b", To: "c"}}
	res := func(v ...v1alpha1.VerificationVerdict) *v1alpha1.MeshVerification {
		mv := &v1alpha1.MeshVerification{Spec: v1alpha1.MeshVerificationSpec{Pairs: pairs}}
		for i, x := range v {
			mv.Status.Results = append(mv.Status.Results, v1alpha1.VerificationResult{From: pairs[i].From, To: pairs[i].To,
				Phase: v1alpha1.PhaseComplete, Verdict: x, Mode: v1alpha1.ModeWireGuard, Cipher: "ChaCha20-Poly1305"})
		}
		return mv
	}
	enc, plain, fail := v1alpha1.VerdictEncrypted, v1alpha1.VerdictPlaintextSeen, v1alpha1.VerdictFailed
	tests := []struct {
		name       string
		mv         *v1alpha1.MeshVerification
		incomplete string
		want       string
		ok         bool
	}{
		{"all encrypted", res(enc, enc, enc), "", "verified: all 3 node pair(s) encrypted (WireGuard, ChaCha20-Poly1305)", true},
		{"one in clear", res(enc, plain, enc), "", "PLAINTEXT SEEN: 2 of 3 node pair(s) encrypted; 1 with the marker in clear on the underlay", false},
		{"one failed", res(enc, fail, enc), "", "NOT VERIFIED: 2 of 3 node pair(s) encrypted; 1 could not be proven", false},
		{"timed out", res(enc), "timed out after 2m0s", "NOT VERIFIED: 1 of 3 node pair(s) encrypted; 2 without a verdict (timed out after 2m0s)", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, ok := verifySummary(tt.mv, tt.incomplete)
			if ok != tt.ok || !strings.HasPrefix(got, tt.want) {
				t.Errorf("verifySummary = %q, %v; want prefix %q, %v", got, ok, tt.want, tt.ok)
			}
		})
	}
}
