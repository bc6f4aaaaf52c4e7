package v1alpha1

import metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

// MeshConfigName is the name of the one MeshConfig the agents read.
const MeshConfigName = "default"

// Annotations `meshcrypt encryption enable|disable` puts on the MeshConfig for the audit
// trail: who changed the mode, when, and what the change was. The agents repeat them in
// their ModeApplied Events and logs.
const (
	AnnotationChangedBy = "meshcrypt.io/changed-by"
	AnnotationChangedAt = "meshcrypt.io/changed-at"
	AnnotationChange    = "meshcrypt.io/change"
)

// EncryptionMode selects how pod traffic between nodes is protected.
// +kubebuilder:validation:Enum=Disabled;WireGuard;IPsec
type EncryptionMode string

// The encryption modes.
const (
	// ModeDisabled sends pod traffic between nodes over the underlay routes, unencrypted.
	ModeDisabled EncryptionMode = "Disabled"
	// ModeWireGuard routes pod traffic between nodes through WireGuard.
	ModeWireGuard EncryptionMode = "WireGuard"
	// ModeIPsec encrypts pod traffic between nodes with tunnel-mode ESP (XFRM), keyed from
	// the keyring Secret meshcrypt-ipsec-keys.
	ModeIPsec EncryptionMode = "IPsec"
)

// Condition types of MeshConfig status, written by the agent holding the cluster's lease
// from every MeshNode's status.
const (
	// ConfigApplied is true when every node has applied the configured mode; false names the
	// nodes that have not and why (a node refusing the mode: no ESP in its kernel, FIPS).
	ConfigApplied = "Applied"
	// ConfigEncrypted is true when encryption is on and every node reports all its peers
	// encrypted.
	ConfigEncrypted = "Encrypted"
)

// MeshConfig is the cluster-wide meshcrypt configuration. There is exactly one, named
// "default"; agents treat a missing MeshConfig as mode Disabled.
//
// +kubebuilder:object:root=true
// +kubebuilder:resource:scope=Cluster,shortName=mcfg
// +kubebuilder:validation:XValidation:rule="self.metadata.name == 'default'",message="there is one MeshConfig and it is named default"
// +kubebuilder:subresource:status
// +kubebuilder:printcolumn:name="Mode",type=string,JSONPath=`.spec.encryption.mode`
// +kubebuilder:printcolumn:name="Applied",type=string,JSONPath=`.status.conditions[?(@.type=="Applied")].status`
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=`.metadata.creationTimestamp`
type MeshConfig struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	// Spec is the desired configuration.
	// +optional
	Spec MeshConfigSpec `json:"spec,omitempty"`
	// Status summarises what the nodes applied.
	// +optional
	Status MeshConfigStatus `json:"status,omitempty"`
}

// MeshConfigStatus summarises the nodes' MeshNode status for the configured mode.
type MeshConfigStatus struct {
	// Conditions are Applied and Encrypted.
	// +listType=map
	// +listMapKey=type
	// +optional
	Conditions []metav1.Condition `json:"conditions,omitempty"`
	// Nodes counts the MeshNodes.
	// +optional
	Nodes int32 `json:"nodes,omitempty"`
	// NodesApplied counts the MeshNodes that applied the configured mode.
	// +optional
	NodesApplied int32 `json:"nodesApplied,omitempty"`
	// ObservedGeneration is the MeshConfig generation the conditions describe.
	// +optional
	ObservedGeneration int64 `json:"observedGeneration,omitempty"`
}

// MeshConfigSpec is the desired cluster-wide configuration.
// +kubebuilder:validation:XValidation:rule="!has(self.remoteClusters) || self.remoteClusters.all(r, r.id != (has(self.cluster) ? self.cluster.id : 1) && r.name != (has(self.cluster) ? self.cluster.name : 'default'))",message="a remote cluster cannot have this cluster's name or ID"
type MeshConfigSpec struct {
	// Encryption selects how pod traffic between nodes is protected.
	// +optional
	Encryption EncryptionSpec `json:"encryption,omitempty"`
	// KeyRotation schedules and requests key rotations.
	// +optional
	KeyRotation *KeyRotationSpec `json:"keyRotation,omitempty"`
	// Cluster names this cluster in a mesh of clusters. Unset: name "default", ID 1.
	// Identities carry the ID (clusterID<<16 | local), so every cluster of a mesh needs its
	// own; agents read it when they start.
	// +optional
	Cluster *ClusterSpec `json:"cluster,omitempty"`
	// RemoteClusters are the other clusters of the mesh: agents import their MeshNodes and
	// MeshIdentities and encrypt pod traffic to their nodes. `meshcrypt clustermesh connect`
	// fills it in.
	// +listType=map
	// +listMapKey=name
	// +kubebuilder:validation:MaxItems=254
	// +kubebuilder:validation:XValidation:rule="self.all(r, self.exists_one(o, o.id == r.id))",message="remote cluster IDs must be unique"
	// +optional
	RemoteClusters []RemoteCluster `json:"remoteClusters,omitempty"`
	// Policy configures how MeshPolicies apply.
	// +kubebuilder:default={}
	// +optional
	Policy PolicyConfig `json:"policy,omitempty"`
}

// PolicyConfig configures how MeshPolicies apply on every node.
type PolicyConfig struct {
	// AllowHostToLocalPods lets traffic from a node's own addresses reach the pods on that
	// node whatever their ingress policies say, so kubelet probes keep working under
	// default-deny ingress (as Cilium and Calico do by default). False: a pod under ingress
	// policy accepts its node's traffic only when a rule names the entity host.
	// Default true.
	// +kubebuilder:default=true
	// +optional
	AllowHostToLocalPods *bool `json:"allowHostToLocalPods,omitempty"`
}

// HostToLocalPodsAllowed reports AllowHostToLocalPods, unset meaning true (the default).
func (p PolicyConfig) HostToLocalPodsAllowed() bool {
	return p.AllowHostToLocalPods == nil || *p.AllowHostToLocalPods
}

// ClusterSpec names a cluster.
type ClusterSpec struct {
	// Name is the cluster's name, a DNS label: the value of the meshcrypt.io/cluster label
	// policies select by.
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:MaxLength=63
	// +kubebuilder:validation:Pattern=`^[a-z0-9]([-a-z0-9]*[a-z0-9])?$`
	Name string `json:"name"`
	// ID is the cluster's number in the mesh, 1-255, unique across the mesh.
	// +kubebuilder:validation:Minimum=1
	// +kubebuilder:validation:Maximum=255
	ID int32 `json:"id"`
}

// RemoteCluster is another cluster of the mesh.
type RemoteCluster struct {
	// Name is the remote cluster's name (its MeshConfig spec.cluster.name).
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:MaxLength=63
	// +kubebuilder:validation:Pattern=`^[a-z0-9]([-a-z0-9]*[a-z0-9])?$`
	Name string `json:"name"`
	// ID is the remote cluster's ID (its MeshConfig spec.cluster.id).
	// +kubebuilder:validation:Minimum=1
	// +kubebuilder:validation:Maximum=255
	ID int32 `json:"id"`
	// SecretName is a Secret in the agents' namespace whose key "kubeconfig" reaches the
	// remote API server with read-only rights on MeshNodes and MeshIdentities.
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:MaxLength=253
	SecretName string `json:"secretName"`
}

// AllNodes names every node in a rotation request.
const AllNodes = "*"

// KeyRotationSpec schedules key rotations (Every) and records the ones operators request
// (`meshcrypt keys rotate`).
type KeyRotationSpec struct {
	// Every rotates WireGuard keys automatically: each agent replaces its key once it is this
	// old. Unset: no automatic rotation. (IPsec keyrings are rotated with `meshcrypt keys
	// rotate`, e.g. from a CronJob.)
	// +kubebuilder:validation:Type=string
	// +kubebuilder:validation:Format=duration
	// +optional
	Every *metav1.Duration `json:"every,omitempty"`
	// Requests are rotations an operator asked for: the WireGuard key of every node the
	// request names is replaced if it was created before the request.
	// +listType=map
	// +listMapKey=node
	// +kubebuilder:validation:MaxItems=64
	// +optional
	Requests []RotationRequest `json:"requests,omitempty"`
}

// RotationRequest asks for one node's (or every node's) WireGuard key to be replaced.
type RotationRequest struct {
	// Node is the node whose key is rotated, or "*" for every node.
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:MaxLength=253
	Node string `json:"node"`
	// RequestedAt is when the rotation was asked for: keys created before are replaced.
	RequestedAt metav1.MicroTime `json:"requestedAt"`
	// RequestedBy is who asked (the CLI records the caller's user name), for the audit trail.
	// +kubebuilder:validation:MaxLength=253
	// +optional
	RequestedBy string `json:"requestedBy,omitempty"`
}

// RemoteKubeconfigKey is the key of a remote cluster's Secret that holds the kubeconfig.
const RemoteKubeconfigKey = "kubeconfig"

// EncryptionSpec selects the encryption mode.
// +kubebuilder:validation:XValidation:rule="!has(self.strict) || !self.strict || self.mode != 'Disabled'",message="strict needs an encryption mode"
// +kubebuilder:validation:XValidation:rule="!has(self.nodeEncryption) || !self.nodeEncryption || self.mode != 'IPsec'",message="nodeEncryption needs mode WireGuard: IPsec encrypts pod traffic only"
type EncryptionSpec struct {
	// Mode is the encryption mode; Disabled sends pod traffic in clear over the underlay.
	// +kubebuilder:default=Disabled
	// +optional
	Mode EncryptionMode `json:"mode,omitempty"`
	// Strict drops, never sends in clear, pod traffic to a remote node whose tunnel is not
	// ready (a node joining, a refused or restarting peer), counted as drop_not_encrypted.
	// +optional
	Strict bool `json:"strict,omitempty"`
	// IPsec configures mode IPsec.
	// +optional
	IPsec *IPsecConfig `json:"ipsec,omitempty"`
	// NodeEncryption encrypts traffic between the nodes' own addresses as well (host network:
	// kubelets, hostNetwork pods, NodePort hops), through the same WireGuard tunnels; mode
	// WireGuard only. It changes without dropping connections: a node routes another's
	// address into the tunnel only once that node announces (MeshNode spec.nodeEncryption)
	// that it accepts it there, and accepts through the tunnel whatever a peer announces.
	// +optional
	NodeEncryption bool `json:"nodeEncryption,omitempty"`
	// NodeEncryptionOptOutLabels is a label selector (kubectl's syntax, e.g.
	// "node-role.kubernetes.io/control-plane" or "tier in (edge)"): nodes whose labels it
	// matches keep their host traffic in clear while their pod traffic stays encrypted. The
	// default opts out control-plane nodes, so that no node needs a tunnel to reach the API
	// server it learns its peers' keys from. The empty string opts out no node.
	// +kubebuilder:default="node-role.kubernetes.io/control-plane"
	// +kubebuilder:validation:MaxLength=1024
	// +optional
	NodeEncryptionOptOutLabels *string `json:"nodeEncryptionOptOutLabels,omitempty"`
}

// IPsecConfig configures mode IPsec. The keys themselves are in the Secret
// meshcrypt-ipsec-keys in the agents' namespace, never in MeshConfig.
type IPsecConfig struct {
	// RotationGracePeriod is how long a node keeps the states of a previous keyring SPI
	// after every node switched its outbound traffic to the new one (default 1m).
	// +kubebuilder:validation:Type=string
	// +kubebuilder:validation:Format=duration
	// +optional
	RotationGracePeriod *metav1.Duration `json:"rotationGracePeriod,omitempty"`
}

// MeshConfigList is a list of MeshConfig.
//
// +kubebuilder:object:root=true
type MeshConfigList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	// Items are the listed objects.
	Items []MeshConfig `json:"items"`
}
