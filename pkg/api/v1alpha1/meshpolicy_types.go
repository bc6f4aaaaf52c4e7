package v1alpha1

import metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

// PolicyType is a direction a MeshPolicy enforces.
// +kubebuilder:validation:Enum=Ingress;Egress
type PolicyType string

// The policy directions.
const (
	// PolicyTypeIngress governs traffic arriving at the selected endpoints.
	PolicyTypeIngress PolicyType = "Ingress"
	// PolicyTypeEgress governs traffic leaving the selected endpoints.
	PolicyTypeEgress PolicyType = "Egress"
)

// Protocol is an IP protocol a rule names.
// +kubebuilder:validation:Enum=TCP;UDP;ICMP
type Protocol string

// The protocols; ICMP means ICMP for IPv4 and ICMPv6 for IPv6.
const (
	ProtocolTCP  Protocol = "TCP"
	ProtocolUDP  Protocol = "UDP"
	ProtocolICMP Protocol = "ICMP"
)

// PolicyEncryption says whether matching cross-node traffic must be encrypted.
// +kubebuilder:validation:Enum=Optional;Required
type PolicyEncryption string

// The encryption requirements.
const (
	// EncryptionOptional lets matching traffic follow the cluster's mode.
	EncryptionOptional PolicyEncryption = "Optional"
	// EncryptionRequired drops matching cross-node traffic whenever it could not be encrypted.
	EncryptionRequired PolicyEncryption = "Required"
)

// MeshPolicy allows traffic to and from the endpoints it selects, by the identities of their
// peers. Once any policy selects an endpoint in a direction, that direction is default-deny
// (Kubernetes NetworkPolicy semantics); rules only ever allow.
//
// +kubebuilder:object:root=true
// +kubebuilder:resource:scope=Namespaced,shortName=mp
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=`.metadata.creationTimestamp`
type MeshPolicy struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	// Spec is the policy.
	Spec MeshPolicySpec `json:"spec"`
}

// MeshPolicySpec selects endpoints in the policy's namespace and lists what they may do.
type MeshPolicySpec struct {
	// EndpointSelector selects the pods of the policy's namespace it applies to; empty
	// selects every pod of the namespace.
	EndpointSelector metav1.LabelSelector `json:"endpointSelector"`
	// PolicyTypes are the directions this policy makes default-deny for the selected pods.
	// Default: Ingress, plus Egress when egress rules are given.
	// +kubebuilder:validation:MaxItems=2
	// +listType=set
	// +optional
	PolicyTypes []PolicyType `json:"policyTypes,omitempty"`
	// Ingress rules allow traffic to the selected pods.
	// +kubebuilder:validation:MaxItems=64
	// +optional
	Ingress []PolicyRule `json:"ingress,omitempty"`
	// Egress rules allow traffic from the selected pods.
	// +kubebuilder:validation:MaxItems=64
	// +optional
	Egress []PolicyRule `json:"egress,omitempty"`
	// Encryption Required drops matching cross-node traffic of the selected pods whenever it
	// could not be encrypted (no ready peer, mode Disabled).
	// +kubebuilder:default=Optional
	// +optional
	Encryption PolicyEncryption `json:"encryption,omitempty"`
}

// PolicyRule allows traffic with any of its peers on any of its ports. No peers means every
// peer; no ports means every port and protocol.
type PolicyRule struct {
	// Peers are the other ends: to (egress) or from (ingress).
	// +kubebuilder:validation:MaxItems=32
	// +optional
	Peers []PolicyPeer `json:"peers,omitempty"`
	// Ports are the destination ports and protocols.
	// +kubebuilder:validation:MaxItems=32
	// +optional
	Ports []PolicyPort `json:"ports,omitempty"`
}

// PolicyPeer selects workloads by labels and namespace (and, with the cluster mesh, cluster).
// Both selectors set means pods matching podSelector in namespaces matching
// namespaceSelector; only podSelector means the policy's own namespace.
// +kubebuilder:validation:XValidation:rule="has(self.podSelector) || has(self.namespaceSelector)",message="a peer needs a podSelector or a namespaceSelector"
type PolicyPeer struct {
	// PodSelector selects pods by their labels.
	// +optional
	PodSelector *metav1.LabelSelector `json:"podSelector,omitempty"`
	// NamespaceSelector selects namespaces by their labels.
	// +optional
	NamespaceSelector *metav1.LabelSelector `json:"namespaceSelector,omitempty"`
}

// PolicyPort is a destination port and protocol.
// +kubebuilder:validation:XValidation:rule="!has(self.port) || self.protocol != 'ICMP'",message="ICMP has no ports"
type PolicyPort struct {
	// Protocol is TCP, UDP or ICMP.
	// +kubebuilder:default=TCP
	// +optional
	Protocol Protocol `json:"protocol,omitempty"`
	// Port is the destination port; unset means every port of the protocol.
	// +kubebuilder:validation:Minimum=1
	// +kubebuilder:validation:Maximum=65535
	// +optional
	Port *int32 `json:"port,omitempty"`
}

// MeshPolicyList is a list of MeshPolicy.
//
// +kubebuilder:object:root=true
type MeshPolicyList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	// Items are the listed objects.
	Items []MeshPolicy `json:"items"`
}
