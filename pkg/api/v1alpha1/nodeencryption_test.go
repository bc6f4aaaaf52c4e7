package v1alpha1

import (
	"strings"
	"testing"
)

func TestNodeEncryptionFor(t *testing.T) {
	str := func(s string) *string { return &s }
	wg := ModeWireGuard
	cp := map[string]string{"node-role.kubernetes.io/control-plane": ""}
	edge := map[string]string{"tier": "edge"}
	tests := []struct {
		name    string
		enc     EncryptionSpec
		labels  map[string]string
		want    bool
		wantErr string
	}{
		{"off", EncryptionSpec{Mode: wg}, nil, false, ""},
		{"on", EncryptionSpec{Mode: wg, NodeEncryption: true}, nil, true, ""},
		{"not in mode Disabled", EncryptionSpec{Mode: ModeDisabled, NodeEncryption: true}, nil, false, ""},
		{"not in mode IPsec", EncryptionSpec{Mode: ModeIPsec, NodeEncryption: true}, nil, false, ""},
		{"control plane opts out by default", EncryptionSpec{Mode: wg, NodeEncryption: true}, cp, false, ""},
		{"empty selector opts out none", EncryptionSpec{Mode: wg, NodeEncryption: true, NodeEncryptionOptOutLabels: str("")}, cp, true, ""},
		{"own selector", EncryptionSpec{Mode: wg, NodeEncryption: true, NodeEncryptionOptOutLabels: str("tier in (edge)")}, edge, false, ""},
		{"own selector, other node", EncryptionSpec{Mode: wg, NodeEncryption: true, NodeEncryptionOptOutLabels: str("tier in (edge)")}, cp, true, ""},
		{"invalid selector", EncryptionSpec{Mode: wg, NodeEncryption: true, NodeEncryptionOptOutLabels: str("tier in (")}, nil, false, "nodeEncryptionOptOutLabels"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := tt.enc.NodeEncryptionFor(tt.labels)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("err = %v, want it to mention %q", err, tt.wantErr)
				}
			} else if err != nil {
				t.Fatal(err)
			}
			if got != tt.want {
				t.Errorf("wanted = %v, want %v", got, tt.want)
			}
		})
	}
}
