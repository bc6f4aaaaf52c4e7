package v1alpha1

import metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

// MeshConfigName is the name of the one MeshConfig the agents read.
const MeshConfigName = "default"

// EncryptionMode selects how pod traffic between nodes is protected.
// +kubebuilder:validation:Enum=Disabled;WireGuard
type EncryptionMode string

// The encryption modes.
const (
	// ModeDisabled sends pod traffic between nodes over the underlay routes, unencrypted.
	ModeDisabled EncryptionMode = "Disabled"
	// ModeWireGuard routes pod traffic between nodes through WireGuard.
	ModeWireGuard EncryptionMode = "WireGuard"
)

// MeshConfig is the cluster-wide meshcrypt configuration. There is exactly one, named
// "default"; agents treat a missing MeshConfig as mode Disabled.
//
// +kubebuilder:object:root=true
// +kubebuilder:resource:scope=Cluster,shortName=mcfg
// +kubebuilder:validation:XValidation:rule="self.metadata.name == 'default'",message="there is one MeshConfig and it is named default"
// +kubebuilder:printcolumn:name="Mode",type=string,JSONPath=`.spec.encryption.mode`
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=`.metadata.creationTimestamp`
type MeshConfig struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	// Spec is the desired configuration.
	// +optional
	Spec MeshConfigSpec `json:"spec,omitempty"`
}

// MeshConfigSpec is the desired cluster-wide configuration.
type MeshConfigSpec struct {
	// Encryption selects how pod traffic between nodes is protected.
	// +optional
	Encryption EncryptionSpec `json:"encryption,omitempty"`
}

// EncryptionSpec selects the encryption mode.
// +kubebuilder:validation:XValidation:rule="!has(self.strict) || !self.strict || self.mode != 'Disabled'",message="strict needs an encryption mode"
type EncryptionSpec struct {
	// Mode is the encryption mode; Disabled sends pod traffic in clear over the underlay.
	// +kubebuilder:default=Disabled
	// +optional
	Mode EncryptionMode `json:"mode,omitempty"`
	// Strict drops, never sends in clear, pod traffic to a remote node whose tunnel is not
	// ready (a node joining, a refused or restarting peer), counted as drop_not_encrypted.
	// +optional
	Strict bool `json:"strict,omitempty"`
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
