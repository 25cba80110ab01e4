//! `adapters`: the command line (see the library's `main`).

fn main() {
    adapters_cli::main()
}
