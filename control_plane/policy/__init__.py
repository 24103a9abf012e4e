"""The privacy policy itself (issues 14 and 15): its versioned texts, their versions in
Postgres, notice of material changes (banner acknowledgements and the one e-mail per
user), the processors we share data with and where to lodge a complaint."""
