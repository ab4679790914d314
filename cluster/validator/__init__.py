"""validator-core (trusted, outside Ray): a thin core (:mod:`.core`) composing one desk per concern
(admission, capabilities, placement, organic jobs, the ledger, streams, probes, verification,
scoring), the store and the HTTP app."""
