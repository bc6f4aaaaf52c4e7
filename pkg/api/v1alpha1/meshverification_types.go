package v1alpha1

import metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

// VerificationPhase is how far the agents have got with one pair of a MeshVerification.
// The destination's agent signals it listens by writing the pair's Destination; the phase
// is the source's.
// +kubebuilder:validation:Enum=Probing;Complete
type VerificationPhase string

// The phases of a pair.
const (
	// PhaseProbing: the source agent sends probes and captures its underlay.
	PhaseProbing VerificationPhase = "Probing"
	// PhaseComplete: the source agent has written the pair's verdict.
	PhaseComplete VerificationPhase = "Complete"
)

// VerificationVerdict is the outcome of one pair.
// +kubebuilder:validation:Enum=Encrypted;PlaintextSeen;Failed
type VerificationVerdict string

// The verdicts.
const (
	// VerdictEncrypted: marker packets went both ways between the nodes' health endpoints and
	// no frame either node put on its underlay contained the marker.
	VerdictEncrypted VerificationVerdict = "Encrypted"
	// VerdictPlaintextSeen: a frame on an underlay contained the marker: traffic between
	// the nodes goes in clear.
	VerdictPlaintextSeen VerificationVerdict = "PlaintextSeen"
	// VerdictFailed: the proof could not be made (no probe arrived, no agent answered);
	// the message says why. It proves nothing either way.
	VerdictFailed VerificationVerdict = "Failed"
)

// MeshVerification asks the agents for an active proof of encryption between pairs of
// nodes, and keeps the outcome as an audit record: for each pair the source node's agent
// sends UDP probes carrying a random marker from its health endpoint to the destination's,
// the destination echoes them, and each agent captures the frames it puts on its underlay
// and looks for the marker. `meshcrypt verify` creates one and prints the result.
//
// +kubebuilder:object:root=true
// +kubebuilder:resource:scope=Cluster,shortName=mv
// +kubebuilder:subresource:status
// +kubebuilder:printcolumn:name="Pairs",type=integer,JSONPath=`.status.pairs`
// +kubebuilder:printcolumn:name="Encrypted",type=integer,JSONPath=`.status.encrypted`
// +kubebuilder:printcolumn:name="Requested-By",type=string,JSONPath=`.spec.requestedBy`
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=`.metadata.creationTimestamp`
type MeshVerification struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	// Spec names the node pairs to prove.
	Spec MeshVerificationSpec `json:"spec"`
	// Status holds one result per pair, written by the pairs' agents.
	// +optional
	Status MeshVerificationStatus `json:"status,omitempty"`
}

// MeshVerificationSpec names the node pairs to prove. It is immutable: an audit record
// says what was asked.
// +kubebuilder:validation:XValidation:rule="self == oldSelf",message="a MeshVerification is immutable: create a new one"
type MeshVerificationSpec struct {
	// Pairs are the ordered node pairs: probes go from From to To and echoes back.
	// +kubebuilder:validation:MinItems=1
	// +kubebuilder:validation:MaxItems=1000
	// +listType=map
	// +listMapKey=from
	// +listMapKey=to
	Pairs []VerificationPair `json:"pairs"`
	// Marker is the random text every probe carries (16-64 characters): what the captures
	// look for.
	// +kubebuilder:validation:MinLength=16
	// +kubebuilder:validation:MaxLength=64
	// +kubebuilder:validation:Pattern=`^[A-Za-z0-9-]+$`
	Marker string `json:"marker"`
	// Probes is the number of probes per pair (default 10).
	// +kubebuilder:validation:Minimum=1
	// +kubebuilder:validation:Maximum=100
	// +kubebuilder:default=10
	// +optional
	Probes int32 `json:"probes,omitempty"`
	// Target is the traffic proven: Pods (default) between the nodes' health endpoints, an
	// address of each pod CIDR, so probes take the pod path; Hosts between the nodes'
	// underlay addresses, the path of host traffic (node encryption).
	// +kubebuilder:validation:Enum=Pods;Hosts
	// +kubebuilder:default=Pods
	// +optional
	Target VerificationTarget `json:"target,omitempty"`
	// RequestedBy is who asked (the CLI records the caller's user name).
	// +kubebuilder:validation:MaxLength=253
	// +optional
	RequestedBy string `json:"requestedBy,omitempty"`
}

// VerificationTarget is the traffic a MeshVerification proves.
type VerificationTarget string

// The verification targets.
const (
	// TargetPods proves pod traffic: probes between the nodes' health endpoints.
	TargetPods VerificationTarget = "Pods"
	// TargetHosts proves host traffic: probes between the nodes' underlay addresses.
	TargetHosts VerificationTarget = "Hosts"
)

// VerificationPair is an ordered pair of nodes.
// +kubebuilder:validation:XValidation:rule="self.from != self.to",message="a pair needs two different nodes"
type VerificationPair struct {
	// From is the node whose agent sends the probes.
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:MaxLength=253
	From string `json:"from"`
	// To is the node whose agent echoes them.
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:MaxLength=253
	To string `json:"to"`
}

// MeshVerificationStatus holds the pairs' results.
type MeshVerificationStatus struct {
	// Results are the pairs' results, one per pair once its agents have answered. Each
	// agent writes its own fields with server-side apply.
	// +listType=map
	// +listMapKey=from
	// +listMapKey=to
	// +kubebuilder:validation:MaxItems=1000
	// +optional
	Results []VerificationResult `json:"results,omitempty"`
	// Pairs and Encrypted count the pairs and those proven encrypted (written by the CLI
	// when every pair is complete).
	// +optional
	Pairs int32 `json:"pairs,omitempty"`
	// +optional
	Encrypted int32 `json:"encrypted,omitempty"`
}

// VerificationResult is the outcome for one pair. The source's agent writes every field but
// Destination, the destination's agent writes Destination.
type VerificationResult struct {
	// From and To name the pair.
	From string `json:"from"`
	To   string `json:"to"`
	// Phase is Probing while the source sends, Complete once the verdict is in. The
	// destination is ready to echo once Destination is set.
	// +optional
	Phase VerificationPhase `json:"phase,omitempty"`
	// Verdict is the pair's outcome (with Phase Complete).
	// +optional
	Verdict VerificationVerdict `json:"verdict,omitempty"`
	// Message explains a Failed or PlaintextSeen verdict.
	// +kubebuilder:validation:MaxLength=1024
	// +optional
	Message string `json:"message,omitempty"`
	// Mode and Cipher are what the source node had applied when it sent: the encryption
	// mode and its cipher (ChaCha20-Poly1305 for WireGuard, the keyring algorithm for IPsec).
	// +optional
	Mode EncryptionMode `json:"mode,omitempty"`
	// +optional
	Cipher string `json:"cipher,omitempty"`
	// Strict is the source node's strict setting.
	// +optional
	Strict bool `json:"strict,omitempty"`
	// StartedAt and CompletedAt bracket the source's probing.
	// +optional
	StartedAt *metav1.MicroTime `json:"startedAt,omitempty"`
	// +optional
	CompletedAt *metav1.MicroTime `json:"completedAt,omitempty"`
	// ProbesSent and EchoesReceived are counted by the source.
	// +optional
	ProbesSent int32 `json:"probesSent,omitempty"`
	// +optional
	EchoesReceived int32 `json:"echoesReceived,omitempty"`
	// Source is the source node's capture of the frames it sent to the destination.
	// +optional
	Source *CaptureResult `json:"source,omitempty"`
	// Destination is the destination node's capture of the frames it sent back, and the
	// probes it received.
	// +optional
	Destination *CaptureResult `json:"destination,omitempty"`
}

// CaptureResult is what one node's agent saw on its underlay during a verification.
type CaptureResult struct {
	// Interfaces are the underlay interfaces captured.
	// +kubebuilder:validation:MaxItems=8
	// +optional
	Interfaces []string `json:"interfaces,omitempty"`
	// Frames counts the frames the node sent to the other node's underlay addresses.
	// +optional
	Frames int32 `json:"frames,omitempty"`
	// EncryptedFrames counts those that were ESP or WireGuard (UDP to or from a WireGuard
	// port).
	// +optional
	EncryptedFrames int32 `json:"encryptedFrames,omitempty"`
	// PlaintextFrames counts those that contained the marker: traffic in clear.
	// +optional
	PlaintextFrames int32 `json:"plaintextFrames,omitempty"`
	// ProbesReceived counts the probes that reached this node's health endpoint (on the
	// destination).
	// +optional
	ProbesReceived int32 `json:"probesReceived,omitempty"`
	// Done is set when the node has stopped capturing: its counts are final.
	// +optional
	Done bool `json:"done,omitempty"`
}

// MeshVerificationList is a list of MeshVerification.
//
// +kubebuilder:object:root=true
type MeshVerificationList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	// Items are the listed objects.
	Items []MeshVerification `json:"items"`
}
