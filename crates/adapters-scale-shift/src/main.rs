//! The `adapters` command line with the scale-and-shift family linked: the one line a
//! team adds for a family crate of its own.

fn main() {
    adapters_scale_shift::family();
    adapters_cli::main()
}
