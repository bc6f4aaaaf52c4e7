package status

import (
	"fmt"
	"io"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/meshcrypt/meshcrypt/pkg/api/v1alpha1"
	"github.com/meshcrypt/meshcrypt/pkg/crypto/wireguard"
)

// KeyNode is one node's keys as `meshcrypt keys status` shows them: fingerprints and ages,
// never a key.
type KeyNode struct {
	// Name is the node's name.
	Name string `json:"name"`
	// Fingerprint identifies the node's WireGuard public key.
	Fingerprint string `json:"keyFingerprint,omitempty"`
	// KeyCreated is when the node generated its WireGuard key.
	KeyCreated *time.Time `json:"keyCreated,omitempty"`
	// KeyAge is the key's age when the report was made, rounded to the second.
	KeyAge string `json:"keyAge,omitempty"`
	// RotationPending says why the node's WireGuard key is due for replacement and has not
	// been replaced yet ("" when it is not).
	RotationPending string `json:"rotationPending,omitempty"`
	// IPsecOutboundSPI is the keyring SPI the node encrypts with; IPsecSPIs those installed.
	IPsecOutboundSPI int   `json:"ipsecOutboundSPI,omitempty"`
	IPsecSPIs        []int `json:"ipsecSPIs,omitempty"`
}

// KeysReport is the key state of the cluster.
type KeysReport struct {
	// Mode is the configured encryption mode.
	Mode v1alpha1.EncryptionMode `json:"mode"`
	// Every is the automatic rotation period ("" when none).
	Every string `json:"every,omitempty"`
	// Nodes is one entry per MeshNode, sorted by name.
	Nodes []KeyNode `json:"nodes"`
	// IPsecRotation describes an IPsec key rotation in progress ("" when none).
	IPsecRotation string `json:"ipsecRotation,omitempty"`
}

// Keys builds the key report from the MeshConfig (nil: none) and the MeshNodes at now.
func Keys(cfg *v1alpha1.MeshConfig, nodes []v1alpha1.MeshNode, now time.Time) KeysReport {
	r := KeysReport{Mode: v1alpha1.ModeDisabled}
	var kr *v1alpha1.KeyRotationSpec
	if cfg != nil {
		if cfg.Spec.Encryption.Mode != "" {
			r.Mode = cfg.Spec.Encryption.Mode
		}
		kr = cfg.Spec.KeyRotation
		if kr != nil && kr.Every != nil && kr.Every.Duration > 0 {
			r.Every = kr.Every.Duration.String()
		}
	}
	for i := range nodes {
		mn := &nodes[i]
		k := KeyNode{Name: mn.Name}
		if wg := mn.Spec.WireGuard; wg != nil {
			if pub, err := wgtypes.ParseKey(wg.PublicKey); err == nil {
				k.Fingerprint = wireguard.Fingerprint(pub)
			}
			if wg.KeyCreated != nil {
				t := wg.KeyCreated.Time
				k.KeyCreated = &t
				k.KeyAge = now.Sub(t).Round(time.Second).String()
			}
		}
		k.RotationPending = PendingRotation(mn, kr, now)
		if ip := mn.Status.IPsec; ip != nil {
			k.IPsecOutboundSPI = int(ip.OutboundSPI)
		}
		if ip := mn.Spec.IPsec; ip != nil {
			for _, s := range ip.SPIs {
				k.IPsecSPIs = append(k.IPsecSPIs, int(s))
			}
		}
		r.Nodes = append(r.Nodes, k)
	}
	slices.SortFunc(r.Nodes, func(a, b KeyNode) int { return strings.Compare(a.Name, b.Name) })
	r.IPsecRotation = IPsecRotation(nodes)
	return r
}

// PendingRotation says why mn's WireGuard key is due and not yet replaced: a request
// naming it (or every node) made after its key was created, or the key older than Every.
// "" when none.
func PendingRotation(mn *v1alpha1.MeshNode, kr *v1alpha1.KeyRotationSpec, now time.Time) string {
	if kr == nil || mn.Spec.WireGuard == nil || mn.Spec.WireGuard.KeyCreated == nil {
		return ""
	}
	created := mn.Spec.WireGuard.KeyCreated.Time
	for _, r := range kr.Requests {
		if (r.Node == mn.Name || r.Node == v1alpha1.AllNodes) && r.RequestedAt.After(created) {
			return fmt.Sprintf("requested at %s", r.RequestedAt.UTC().Format(time.RFC3339))
		}
	}
	if kr.Every != nil && kr.Every.Duration > 0 && now.Sub(created) >= kr.Every.Duration {
		return "older than " + kr.Every.Duration.String()
	}
	return ""
}

// IPsecRotation describes an IPsec rotation in progress: nodes that do not all report the
// same single SPI, installed and in use. "" when every IPsec node is on one key.
func IPsecRotation(nodes []v1alpha1.MeshNode) string {
	var parts []string
	spis := map[string]bool{}
	for i := range nodes {
		mn := &nodes[i]
		if mn.Spec.IPsec == nil {
			continue
		}
		installed := fmt.Sprint(mn.Spec.IPsec.SPIs)
		spis[installed] = true
		out := 0
		if mn.Status.IPsec != nil {
			out = int(mn.Status.IPsec.OutboundSPI)
		}
		if len(mn.Spec.IPsec.SPIs) != 1 || int(mn.Spec.IPsec.SPIs[0]) != out {
			parts = append(parts, fmt.Sprintf("%s: SPIs %v, outbound %d", mn.Name, mn.Spec.IPsec.SPIs, out))
		}
	}
	if len(parts) == 0 && len(spis) <= 1 {
		return ""
	}
	slices.Sort(parts)
	if len(parts) == 0 {
		return "nodes report different SPIs"
	}
	return strings.Join(parts, "; ")
}

// WriteTable writes the report for people.
func (r KeysReport) WriteTable(w io.Writer) error {
	every := "none"
	if r.Every != "" {
		every = "every " + r.Every
	}
	fmt.Fprintf(w, "mode: %s; automatic rotation: %s\n", r.Mode, every)
	if r.IPsecRotation != "" {
		fmt.Fprintf(w, "IPsec rotation in progress: %s\n", r.IPsecRotation)
	}
	fmt.Fprintln(w)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "NODE\tWIREGUARD KEY\tAGE\tROTATION\tIPSEC OUT SPI\tIPSEC SPIS")
	for _, n := range r.Nodes {
		spis := make([]string, len(n.IPsecSPIs))
		for i, s := range n.IPsecSPIs {
			spis[i] = strconv.Itoa(s)
		}
		out := "-"
		if n.IPsecOutboundSPI > 0 {
			out = strconv.Itoa(n.IPsecOutboundSPI)
		}
		rot := "-"
		if n.RotationPending != "" {
			rot = "pending: " + n.RotationPending
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", n.Name, dash(n.Fingerprint), dash(n.KeyAge), rot, out, dash(strings.Join(spis, ",")))
	}
	return tw.Flush()
}
