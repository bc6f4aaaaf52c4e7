package main

import (
	"bytes"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/meshcrypt/meshcrypt/pkg/api/v1alpha1"
	"github.com/meshcrypt/meshcrypt/pkg/crypto/ipsec"
)

func TestNextKeyring(t *testing.T) {
	k := func(spi uint8) ipsec.Key {
		key, err := ipsec.NewKey(spi, ipsec.AESGCM, bytes.Repeat([]byte{spi}, 20), 128)
		if err != nil {
			t.Fatal(err)
		}
		return key
	}
	kr, err := ipsec.NewKeyring(k(1), k(2))
	if err != nil {
		t.Fatal(err)
	}
	nk, err := nextKeyring(kr)
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff([]uint8{2, 3}, nk.SPIs()); diff != "" {
		t.Errorf("next keyring SPIs (-want +got):\n%s", diff)
	}
	if k3, _ := nk.Key(3); k3.Algorithm() != ipsec.AESGCM || k3.Equal(k(3)) {
		t.Errorf("new key %v: want a random AES-GCM key", k3)
	}
	last, _ := ipsec.NewKeyring(k(15))
	if _, err := nextKeyring(last); err == nil || !strings.Contains(err.Error(), "SPI 15") {
		t.Errorf("next after SPI 15: %v, want a clear refusal", err)
	}
}

func mn(name string, pub string, peers map[string]string) v1alpha1.MeshNode {
	m := v1alpha1.MeshNode{}
	m.Name = name
	m.Spec.WireGuard = &v1alpha1.WireGuardSpec{PublicKey: pub, ListenPort: 51871}
	m.Status.Mode = v1alpha1.ModeWireGuard
	for n, k := range peers {
		m.Status.Peers = append(m.Status.Peers, v1alpha1.PeerStatus{Node: n, PublicKey: k})
	}
	return m
}

func TestWireGuardRotationProgress(t *testing.T) {
	before := map[string]string{"a": "A1"}
	got := wireGuardRotationProgress([]v1alpha1.MeshNode{mn("a", "A1", nil), mn("b", "B1", map[string]string{"a": "A1"})}, before)
	if got["a"] != "waiting: new key not published yet" || len(got) != 1 {
		t.Errorf("before the rotation: %v", got)
	}
	got = wireGuardRotationProgress([]v1alpha1.MeshNode{mn("a", "A2", nil), mn("b", "B1", map[string]string{"a": "A1"})}, before)
	if got["a"] != "waiting: new key not configured on b" {
		t.Errorf("published, not configured: %v", got)
	}
	got = wireGuardRotationProgress([]v1alpha1.MeshNode{mn("a", "A2", nil), mn("b", "B1", map[string]string{"a": "A2"})}, before)
	if got["a"] != "done" {
		t.Errorf("configured: %v", got)
	}
}

func TestIPsecRotationProgress(t *testing.T) {
	node := func(name string, out int32, spis ...int32) v1alpha1.MeshNode {
		m := v1alpha1.MeshNode{}
		m.Name = name
		m.Spec.IPsec = &v1alpha1.IPsecSpec{NodeID: 1, SPIs: spis}
		m.Status.IPsec = &v1alpha1.IPsecStatus{OutboundSPI: out}
		return m
	}
	got := ipsecRotationProgress([]v1alpha1.MeshNode{node("a", 1, 1), node("b", 1, 1, 2), node("c", 2, 1, 2), node("d", 2, 2), {}}, 2)
	want := map[string]string{
		"a": "waiting: SPI 2 not installed yet",
		"b": "waiting: installed, still encrypting with SPI 1 until every node has 2",
		"c": "waiting: encrypting with SPI 2, old keys [1 2] go after the grace period",
		"d": "done",
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("progress (-want +got):\n%s", diff)
	}
}
